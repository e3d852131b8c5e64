"""Corpus loading: raw-byte documents split into training and validation sets."""

from triform.data.corpus import Corpus, Document, load_corpus
from triform.data.shakespeare import fetch_shakespeare, shakespeare_corpus

__all__ = ["Corpus", "Document", "fetch_shakespeare", "load_corpus", "shakespeare_corpus"]
