"""Moved to ``fastattn.models.data``; this name stays for existing imports."""
from fastattn.models.data import (BatchSampler, BPETokenizer, ByteTokenizer, TokenData,
                                  default_cache_dir, load_or_train_bpe, prepare,
                                  stdlib_sources, text_files, tokenizer_from_spec)

__all__ = ["BPETokenizer", "BatchSampler", "ByteTokenizer", "TokenData", "default_cache_dir",
           "load_or_train_bpe", "prepare", "stdlib_sources", "text_files",
           "tokenizer_from_spec"]
