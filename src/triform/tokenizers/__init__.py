"""Tokenizers: byte-level (token-free), byte-level BPE and pretrained HF tokenizers behind one interface."""

from triform.tokenizers.base import StreamDecoder, Tokenizer, load_tokenizer
from triform.tokenizers.bpe import BPETokenizer
from triform.tokenizers.byte import ByteTokenizer
from triform.tokenizers.hf import HFTokenizer

__all__ = ["BPETokenizer", "ByteTokenizer", "HFTokenizer", "StreamDecoder", "Tokenizer", "load_tokenizer"]
