"""Output folders that never swallow a user's files.

A command that writes a folder first claims it with ``claim_output_dir``: a new or empty folder is
used, and so is one holding this command's own earlier output, recognised by a small marker file
(``.triform-output.json``, naming the command) or, for folders written before markers existed, by a
triform checkpoint layout. Anything else is refused unless the user passes ``--overwrite``.
``check_output_dir`` asks the same question without touching anything (to refuse before slow work),
and ``write_output_dir`` replaces a claimed folder with fresh output in one swap.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from triform.errors import ConfigError

MARKER = ".triform-output.json"


def _is_triform_config(path: Path) -> bool:
    """Whether ``path`` is a ``config.json`` of a triform checkpoint."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(meta, dict) and meta.get("format") == "triform"


def _marker_command(folder: Path) -> str | None:
    """The command named by ``folder``'s marker file, or None without a readable marker."""
    try:
        meta = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    command = meta.get("command") if isinstance(meta, dict) else None
    return command if isinstance(command, str) else None


def is_own_output(folder: Path | str, command: str) -> bool:
    """Whether ``folder`` holds output of triform ``command``: its marker names the command, or it has
    no marker and holds a triform checkpoint (``config.json`` or ``checkpoint/config.json`` of format
    "triform"), as folders written before markers existed do."""
    folder = Path(folder)
    if (folder / MARKER).exists():
        return _marker_command(folder) == command
    return _is_triform_config(folder / "config.json") or _is_triform_config(folder / "checkpoint" / "config.json")


def mark_output_dir(folder: Path | str, *, command: str) -> Path:
    """Write the marker that records ``folder`` as output of triform ``command``; returns the folder.
    A command that replaces a claimed folder wholesale calls this on the new one."""
    folder = Path(folder)
    (folder / MARKER).write_text(json.dumps({"command": command, "version": 1}) + "\n", encoding="utf-8")
    return folder


def check_output_dir(path: str | Path, *, command: str, overwrite: bool = False) -> None:
    """Raise the ConfigError that ``claim_output_dir`` would raise for ``path``, creating and marking
    nothing: a command can refuse a folder before slow work and claim it afterwards."""
    folder = Path(path)
    try:
        if folder.is_dir():
            if overwrite or not any(folder.iterdir()) or is_own_output(folder, command):
                return
            raise ConfigError(
                f"{folder} already holds files that triform {command} did not write; choose another folder "
                f"or pass --overwrite to replace them."
            )
        if (folder.exists() or folder.is_symlink()) and not overwrite:
            raise ConfigError(
                f"{folder} is a file, not a folder; choose another folder or pass --overwrite to replace it."
            )
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"the output folder {folder} could not be read ({reason}).") from None


def claim_output_dir(path: str | Path, *, command: str, overwrite: bool = False) -> Path:
    """Make ``path`` the output folder of triform ``command`` and return it. A missing folder is
    created, and an empty folder or one holding this command's own earlier output (see
    ``is_own_output``) is used; both get the marker. Anything else, a file or a folder with other
    content, raises ConfigError unless ``overwrite``, which hands it over as it is (a folder gets the
    marker; a file is left for the command to replace) and lets the command replace what is there."""
    folder = Path(path)
    check_output_dir(folder, command=command, overwrite=overwrite)
    try:
        if folder.is_dir():
            return mark_output_dir(folder, command=command)
        if folder.exists() or folder.is_symlink():
            return folder  # a file, handed over by overwrite
        folder.mkdir(parents=True)
        return mark_output_dir(folder, command=command)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"the output folder {folder} could not be written ({reason}).") from None


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def write_output_dir(path: str | Path, write: Callable[[Path], object], *, command: str) -> Path:
    """Replace the claimed output folder ``path`` with fresh output: ``write(folder)`` fills a hidden
    sibling folder, which gets ``command``'s marker and is then swapped in for ``path``, so stale files
    of earlier output never linger and a failure midway leaves ``path`` as it was. Call it only on a
    folder ``claim_output_dir`` handed over, since what was there is removed."""
    folder = Path(os.path.abspath(path))  # "." has no name to put a sibling beside
    stage, old = folder.with_name(f".{folder.name}.writing"), folder.with_name(f".{folder.name}.replaced")
    for leftover in (stage, old):  # from an earlier run that was interrupted
        _remove(leftover)
    stage.mkdir()
    try:
        write(stage)
        mark_output_dir(stage, command=command)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if folder.exists() or folder.is_symlink():
        os.rename(folder, old)
    os.rename(stage, folder)
    _remove(old)
    return folder


__all__ = ["MARKER", "check_output_dir", "claim_output_dir", "is_own_output", "mark_output_dir", "write_output_dir"]
