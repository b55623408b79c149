"""Training data: text files -> token ids in a memory-mapped file -> random batches.

* Sources: a text file, or a folder of them (read recursively; hidden folders and files
  that look binary — a NUL byte in the first 8 KiB — are skipped). With none given,
  the Python standard library's own sources (``*.py`` under
  ``sysconfig.get_paths()["stdlib"]``, without site-packages and the test suites:
  about 12 MB on CPython 3.11), present on every machine that runs fastattn.
* Tokenizers: ``ByteTokenizer`` (UTF-8 bytes, vocabulary 256, nothing to train or
  download) or ``BPETokenizer`` (byte-level BPE trained on the sources with the
  ``tokenizers`` library, locally, with an ``<|endoftext|>`` token between files).
* Encoding happens once: the ids go to ``<cache>/<key>/tokens.bin`` (uint8 for bytes,
  uint16 up to 65536 tokens, else uint32), read back as an ``np.memmap``. The key hashes
  every source's path, size and mtime and the tokenizer, so changed data re-encodes.
  The first ``1 - val_fraction`` of the stream is the training split, the rest
  validation.
* ``BatchSampler`` draws (B, T) windows at random positions from a split with its own
  ``np.random.Generator``, whose state is saved in checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import os
import sysconfig
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

EOT = "<|endoftext|>"
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
CACHE_ENV = "FASTATTN_CACHE"
FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """``$FASTATTN_CACHE``, else ``~/.cache/fastattn``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fastattn"
    return Path(root)


# ------------------------------------------------------------------------ sources


def stdlib_sources() -> list[Path]:
    """The standard library's ``*.py`` files, without site-packages and test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]     # prune: site-packages is big
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted(f for f in files if f.is_file())


def _is_text(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" not in f.read(8192)


def text_files(data: str | os.PathLike | None = None) -> list[Path]:
    """The files behind ``data``: a file, a folder (recursively), or None for the
    standard library's sources. Sorted, so the token stream is reproducible."""
    if data is None:
        files = stdlib_sources()
        if not files:
            raise ValueError(f"no *.py files found in the standard library folder "
                             f"{sysconfig.get_paths()['stdlib']}; give --data")
        return files
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"data path {str(path)!r} does not exist")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts)
                   and _is_text(p))
    if not files:
        raise ValueError(f"no text files found in folder {str(path)!r}")
    return files


def read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


# --------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    vocab_size: int
    eot: int | None          # appended after each file, if the tokenizer has one

    def encode(self, text: str) -> np.ndarray: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def spec(self) -> dict: ...            # rebuilds it: tokenizer_from_spec(spec)
    def fingerprint(self) -> str: ...      # part of the token cache key


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no end-of-text token."""
    kind, vocab_size, eot = "byte", 256, None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"kind": "byte"}

    def fingerprint(self) -> str:
        return "byte"


class BPETokenizer:
    """Byte-level BPE (GPT-2's scheme) from the ``tokenizers`` library."""
    kind = "bpe"

    def __init__(self, tok) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eot = tok.token_to_id(EOT)

    @classmethod
    def train(cls, files: list[Path], vocab_size: int) -> BPETokenizer:
        """Learn ``vocab_size`` tokens (256 bytes, ``<|endoftext|>`` and merges) from files."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        if vocab_size < 258:
            raise ValueError(f"BPE vocab_size must be >= 258 (256 bytes, {EOT} and at "
                             f"least one merge), got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator((read_text(f) for f in files), trainer=trainer,
                                length=len(files))
        return cls(tok)

    @classmethod
    def from_str(cls, text: str) -> BPETokenizer:
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_str(text))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BPETokenizer:
        return cls.from_str(Path(path).read_text())

    def save(self, path: str | os.PathLike) -> None:
        _atomic_write_bytes(Path(path), self.tok.to_str().encode())

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text).ids, dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def spec(self) -> dict:
        return {"kind": "bpe", "json": self.tok.to_str()}

    def fingerprint(self) -> str:
        return "bpe-" + hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]


def tokenizer_from_spec(spec: dict) -> ByteTokenizer | BPETokenizer:
    """Rebuild a tokenizer from ``tokenizer.spec()`` (as stored in checkpoints)."""
    kind = spec.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.from_str(spec["json"])
    raise ValueError(f"tokenizer kind must be 'byte' or 'bpe', got {kind!r}")


def sources_key(files: list[Path]) -> str:
    """Hash of the sources' paths, sizes and modification times."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def load_or_train_bpe(files: list[Path], vocab_size: int,
                      cache_dir: str | os.PathLike | None = None) -> BPETokenizer:
    """A BPE tokenizer for these sources, trained once and cached by sources + size."""
    path = (Path(cache_dir or default_cache_dir()) / f"bpe-{sources_key(files)}-{vocab_size}"
            / "tokenizer.json")
    if path.exists():
        return BPETokenizer.from_file(path)
    tok = BPETokenizer.train(files, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(path)
    return tok


# ----------------------------------------------------------------------- encoding


def token_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class TokenData:
    """A tokenized corpus: ``train`` and ``val`` are 1-D read-only ``np.memmap`` slices."""

    def __init__(self, directory: Path, val_fraction: float) -> None:
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.directory = directory
        self.meta = json.loads((directory / "meta.json").read_text())
        n = self.meta["n_tokens"]
        tokens = np.memmap(directory / "tokens.bin", dtype=self.meta["dtype"], mode="r",
                           shape=(n,))
        n_train = n - int(round(n * val_fraction))
        self.train, self.val = tokens[:n_train], tokens[n_train:]

    def split(self, name: str) -> np.ndarray:
        if name not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {name!r}")
        return self.train if name == "train" else self.val


def prepare(files: list[Path], tokenizer, cache_dir: str | os.PathLike | None = None,
            val_fraction: float = 0.05) -> TokenData:
    """Encode ``files`` with ``tokenizer`` into the cache (once) and open the result."""
    key = hashlib.sha256(f"{FORMAT_VERSION}|{sources_key(files)}|{tokenizer.fingerprint()}"
                         .encode()).hexdigest()[:20]
    directory = Path(cache_dir or default_cache_dir()) / "tokens" / key
    if not (directory / "meta.json").exists():
        _encode(files, tokenizer, directory)
    return TokenData(directory, val_fraction)


def _encode(files: list[Path], tokenizer, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    n = 0
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tokens-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for path in files:
                ids = tokenizer.encode(read_text(path))
                if tokenizer.eot is not None and len(ids):
                    ids = np.append(ids, tokenizer.eot)
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                n += len(ids)
            f.flush()
            os.fsync(f.fileno())
        if n == 0:
            where = files[0] if len(files) == 1 else f"{len(files)} files"
            raise ValueError(f"the training data is empty: {where} hold no text (0 tokens)")
        os.replace(tmp, directory / "tokens.bin")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    meta = {"n_tokens": n, "dtype": dtype.name, "tokenizer": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size, "n_files": len(files),
            "first_file": str(files[0]), "version": FORMAT_VERSION}
    _atomic_write_bytes(directory / "meta.json", json.dumps(meta, indent=1).encode())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------ batches


class BatchSampler:
    """Random (B, T) windows of a token split; ``y`` is ``x`` shifted by one token.

    The stream of batches is fixed by ``seed`` (an int or a list of ints, e.g.
    ``[seed, rank]`` so each rank draws its own); ``state_dict`` / ``load_state_dict``
    carry the generator's position across a checkpoint.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int,
                 seed: int | list[int] = 0, split: str = "train") -> None:
        if len(tokens) < block_size + 1:
            raise ValueError(
                f"the {split} split holds {len(tokens)} tokens, fewer than block_size + 1 = "
                f"{block_size + 1} that one row needs: give more data, a smaller block "
                f"size, or (for the val split) a larger val fraction")
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))

    def next(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """x, y: (B, T) int64 on ``device``."""
        t = self.block_size
        starts = self.rng.integers(0, len(self.tokens) - t, size=self.batch_size)
        rows = np.stack([self.tokens[s:s + t + 1] for s in starts]).astype(np.int64)
        xy = torch.from_numpy(rows)                                   # (B, T + 1)
        device = torch.device(device)
        if device.type == "cuda":
            xy = xy.pin_memory().to(device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]

    def state_dict(self) -> dict:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state


__all__ = ["BPETokenizer", "BatchSampler", "ByteTokenizer", "TokenData", "default_cache_dir",
           "load_or_train_bpe", "prepare", "stdlib_sources", "text_files",
           "tokenizer_from_spec"]
