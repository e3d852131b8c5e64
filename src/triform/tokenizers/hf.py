"""Pretrained tokenizers as Hugging Face models ship them: a ``tokenizer.json`` and a chat template.

``HFTokenizer`` wraps a ``tokenizers.Tokenizer`` behind triform's Tokenizer protocol. Special
(control) tokens count as zero bytes in ``token_bytes``, so bits-per-byte and streaming decode treat
them the way the byte and BPE tokenizers do. Chat templates render the way ``transformers`` renders
them: a sandboxed Jinja environment with ``trim_blocks``/``lstrip_blocks``, ``raise_exception`` and
a ``tojson`` that does not escape HTML.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from triform.errors import CheckpointError, ConfigError
from triform.tokenizers.base import TokenTableDecoding
from triform.tokenizers.bpe import _UNICODE_TO_BYTE

_CONFIG = "tokenizer_config.json"
_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 saves the template


def _token_text(value: Any) -> str | None:
    """A special token as HF configs spell it: a string, an AddedToken dict with "content", or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _has_type(node: Any, name: str) -> bool:
    """Whether a tokenizer.json component (or any component nested in it) has ``"type": name``."""
    if isinstance(node, dict):
        return node.get("type") == name or any(_has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, name) for v in node)
    return False


class HFTokenizer(TokenTableDecoding):
    """A ``tokenizer.json`` tokenizer with named bos/eos/pad tokens and an optional chat template.
    eos is required; without a pad or bos token, pad_id and bos_id fall back to eos_id."""

    kind = "hf"

    def __init__(
        self, tokenizer_json: str, *, bos_token: str | None, eos_token: str | None, pad_token: str | None = None,
        chat_template: str | None = None, add_bos: bool = False,
    ) -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_str(tokenizer_json)
            self._spec = json.loads(tokenizer_json)
        except Exception as exc:  # the tokenizers library raises plain Exceptions
            raise CheckpointError(f"the tokenizer JSON could not be read ({exc}).") from None
        self._json = tokenizer_json
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.chat_template, self.add_bos = chat_template, add_bos
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        if eos_token is None:
            raise ConfigError("this tokenizer names no eos_token; triform needs one to stop generation.")
        self.eos_id = self.special_id(eos_token)
        self.bos_id = self.special_id(bos_token) if bos_token is not None else self.eos_id
        self.pad_id = self.special_id(pad_token) if pad_token is not None else self.eos_id
        if add_bos and bos_token is None:
            raise ConfigError("add_bos is set but this tokenizer names no bos_token.")
        self._token_bytes: list[bytes] | None = None

    def special_id(self, name: str) -> int:
        """The id of token ``name`` (e.g. ``"<|im_end|>"``)."""
        i = self._tok.token_to_id(name)
        if i is None:
            raise ConfigError(f"the tokenizer has no token {name!r}.")
        return i

    def encode(self, data: bytes | str) -> list[int]:
        """Token ids of ``data``; special-token strings in the text map to their ids, bos only if ``add_bos``."""
        text = data if isinstance(data, str) else bytes(data).decode("utf-8", errors="replace")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos else ids

    def encode_array(self, data: bytes) -> np.ndarray:
        """Token ids of a whole corpus as an int32 array (encoded in one piece, so splits never differ)."""
        return np.asarray(self.encode(data), dtype=np.int32)

    def token_bytes(self) -> list[bytes]:
        """Exact bytes of every id: byte-level BPE and SentencePiece (``▁``, ``<0xNN>``) spellings are undone."""
        if self._token_bytes is None:
            table = [b""] * self.vocab_size
            added = self._tok.get_added_tokens_decoder()
            byte_level = _has_type(self._spec.get("decoder"), "ByteLevel") or _has_type(
                self._spec.get("pre_tokenizer"), "ByteLevel"
            )
            for token, i in self._tok.get_vocab(with_added_tokens=False).items():
                if i not in added:
                    table[i] = _spelled_bytes(token, byte_level)
            for i, tok in added.items():
                # Special tokens are control tokens (no bytes); other added tokens are literal text.
                table[i] = b"" if tok.special else tok.content.encode("utf-8")
            self._token_bytes = table
        return self._token_bytes



    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Render ``messages`` with the chat template exactly as ``transformers``' ``apply_chat_template``
        (``tokenize=False``) does; the result holds special tokens as text, which ``encode`` maps to ids."""
        import jinja2

        if not self.chat_template:
            raise ConfigError("this tokenizer has no chat template; give the prompt as plain text instead.")
        specials = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        # transformers drops None-valued message keys and passes tools/documents as None.
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return _compile(self.chat_template).render(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **{k: v for k, v in specials.items() if v is not None},
            )
        except jinja2.exceptions.TemplateError as exc:
            raise ConfigError(f"the chat template rejected these messages: {exc}") from None

    def save(self, directory: Path) -> None:
        """Write ``tokenizer.json`` and a ``tokenizer_config.json`` naming the special tokens and template."""
        directory = Path(directory)
        (directory / "tokenizer.json").write_text(self._json)
        meta = {
            "kind": self.kind, "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "chat_template": self.chat_template, "add_bos": self.add_bos,
        }
        (directory / _CONFIG).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_folder(cls, directory: Path | str) -> HFTokenizer:
        """Load from a triform-saved folder or a plain HF model folder (``tokenizer.json`` +
        ``tokenizer_config.json``, the template possibly in ``chat_template.jinja``)."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CheckpointError(f"{directory} has no tokenizer.json.") from None
        try:
            spec = json.loads(text)
        except json.JSONDecodeError:
            raise CheckpointError(f"{path} is corrupt (not valid JSON).") from None
        meta: dict[str, Any] = {}
        if (directory / _CONFIG).is_file():
            try:
                meta = json.loads((directory / _CONFIG).read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raise CheckpointError(f"{directory / _CONFIG} is corrupt (not valid JSON).") from None
            if not isinstance(meta, dict):
                raise CheckpointError(f"{directory / _CONFIG} is corrupt (not a JSON object).")
        template = _pick_template(meta.get("chat_template"))
        if template is None and (directory / _TEMPLATE_FILE).is_file():
            template = (directory / _TEMPLATE_FILE).read_text(encoding="utf-8")
        if "add_bos" in meta:
            add_bos = bool(meta["add_bos"])
        elif "add_bos_token" in meta:
            add_bos = bool(meta["add_bos_token"])
        else:
            post = spec.get("post_processor") if isinstance(spec, dict) else None
            add_bos = _post_processor_adds(post, _token_text(meta.get("bos_token")))
        try:
            return cls(
                text, bos_token=_token_text(meta.get("bos_token")), eos_token=_token_text(meta.get("eos_token")),
                pad_token=_token_text(meta.get("pad_token")), chat_template=template, add_bos=add_bos,
            )
        except (ConfigError, CheckpointError) as exc:
            raise CheckpointError(f"{directory} holds an unusable tokenizer: {exc}") from None

    @classmethod
    def load(cls, directory: Path) -> HFTokenizer:
        """Same as ``from_folder``; the name ``load_tokenizer`` dispatches to."""
        return cls.from_folder(directory)


def _spelled_bytes(token: str, byte_level: bool) -> bytes:
    """The bytes a vocabulary entry stands for."""
    if byte_level and all(c in _UNICODE_TO_BYTE for c in token):
        return bytes(_UNICODE_TO_BYTE[c] for c in token)
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):  # SentencePiece byte fallback
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace("\u2581", " ").encode("utf-8")  # SentencePiece marks spaces with ▁


def _pick_template(value: Any) -> str | None:
    """The chat template from an HF config value: a string, or a list of named templates ("default" wins)."""
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default", next(iter(named.values()), None))
    return value if isinstance(value, str) and value else None


def _post_processor_adds(post: Any, bos_token: str | None) -> bool:
    """Whether a tokenizer.json post-processor prepends ``bos_token`` (how Llama 3 adds its bos)."""
    if bos_token is None or not isinstance(post, dict):
        return False
    if post.get("type") == "Sequence":
        return any(_post_processor_adds(p, bos_token) for p in post.get("processors", []))
    single = post.get("single") if post.get("type") == "TemplateProcessing" else None
    return bool(single) and single[0].get("SpecialToken", {}).get("id") == bos_token


_COMPILED: dict[str, Any] = {}


def _compile(template: str) -> Any:
    """A Jinja template compiled in the sandboxed environment transformers uses for chat templates."""
    if template not in _COMPILED:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        class Generation(jinja2.ext.Extension):
            """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; render it as is."""

            tags = frozenset({"generation"})

            def parse(self, parser: Any) -> Any:
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

            def _body(self, caller: Any) -> str:
                return caller()

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            _COMPILED[template] = env.from_string(template)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ConfigError(f"the chat template is not valid Jinja ({exc}).") from None
    return _COMPILED[template]
