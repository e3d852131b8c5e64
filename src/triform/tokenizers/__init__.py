"""Tokenizers: byte-level (token-free) and byte-level BPE behind one interface."""

from triform.tokenizers.base import StreamDecoder, Tokenizer, load_tokenizer
from triform.tokenizers.bpe import BPETokenizer
from triform.tokenizers.byte import ByteTokenizer

__all__ = ["Tokenizer", "ByteTokenizer", "BPETokenizer", "StreamDecoder", "load_tokenizer"]
