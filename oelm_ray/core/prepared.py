"""Tokenizers and the prepared token files: where a corpus's files live, their format, and loading them.

    <data_dir>/<corpus>[-max<N>]-<tokenizer>/train.bin   uint16 (vocab <= 65535) or uint32 tokens
                                             val.bin
                                             meta.json   counts, dtype, checksums; written last

`load_prepared` memory-maps train.bin / val.bin after checking their sizes and checksums against
meta.json, so a truncated or corrupted copy fails loudly. Building the files is `data.prepare`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np
import tiktoken

from .config import VOCAB_SIZES, DataConfig
from .corpora import DataError, corpus

FORMAT_VERSION = 1
SPLITS = ("train", "val")
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
QUICK_FULL_HASH_BYTES = 64 << 20  # verify="quick" hashes whole files below this size
SAMPLE_CHUNKS, SAMPLE_CHUNK_BYTES = 8, 1 << 20  # ... and these fixed chunks above it


# ---------------------------------------------------------------------------------------------
# tokenizers


def get_tokenizer(cfg: DataConfig) -> tiktoken.Encoding:
    """The tiktoken encoding named by cfg.tokenizer (bytes or gpt2)."""
    if cfg.tokenizer == "bytes":
        return _bytes_encoding()
    if cfg.tokenizer == "gpt2":
        return _gpt2_encoding(cfg.gpt2_ranks or os.environ.get("OELM_GPT2_RANKS", ""))
    raise DataError(f"tokenizer={cfg.tokenizer!r} is unknown: choose one of {', '.join(VOCAB_SIZES)}")


@cache
def _bytes_encoding() -> tiktoken.Encoding:
    # every byte is its own token and there are no merges, so any UTF-8 text round-trips; the
    # pattern only chunks the text (whitespace runs and non-whitespace runs cover everything)
    return tiktoken.Encoding(
        name="bytes",
        pat_str=r"\s+|\S+",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|endoftext|>": 256},
        explicit_n_vocab=VOCAB_SIZES["bytes"],
    )


@cache
def _gpt2_encoding(ranks_path: str) -> tiktoken.Encoding:
    if not ranks_path:
        try:
            return tiktoken.get_encoding("r50k_base")
        except Exception as e:  # no network, proxy errors, a bad cache: all end the same way
            raise DataError(
                f"could not load the GPT-2 tokenizer (tiktoken r50k_base): {e}. Offline, set "
                "gpt2_ranks (--gpt2-ranks) or OELM_GPT2_RANKS to a local gpt2.tiktoken (it ships in "
                "the openai-whisper sdist on PyPI as whisper/assets/gpt2.tiktoken), or pre-populate "
                "TIKTOKEN_CACHE_DIR on a machine with network"
            ) from e
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext import openai_public

    path = Path(ranks_path).expanduser()
    if not path.is_file():
        raise DataError(f"GPT-2 ranks file {path} does not exist: fix gpt2_ranks / OELM_GPT2_RANKS")
    try:
        ranks = load_tiktoken_bpe(str(path), expected_hash=GPT2_RANKS_SHA256)
    except ValueError as e:
        raise DataError(
            f"{path} is not the GPT-2 ranks file (its sha256 is not {GPT2_RANKS_SHA256}): point "
            "gpt2_ranks / OELM_GPT2_RANKS at whisper/assets/gpt2.tiktoken from the openai-whisper sdist"
        ) from e
    # same pattern and special token as tiktoken's r50k_base; end-of-text follows the merges
    return tiktoken.Encoding(
        name="r50k_base",
        pat_str=openai_public.r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={openai_public.ENDOFTEXT: len(ranks)},
        explicit_n_vocab=VOCAB_SIZES["gpt2"],
    )


# ---------------------------------------------------------------------------------------------
# prepared token files


def prepared_dir(cfg: DataConfig) -> Path:
    """<data_dir>/<corpus>[-max<N>]-<tokenizer>: one folder per distinct token stream."""
    name = corpus(cfg).name
    if cfg.max_train_tokens:
        name += f"-max{cfg.max_train_tokens}"
    return Path(cfg.data_dir).expanduser() / f"{name}-{cfg.tokenizer}"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def _prepare_hint(cfg: DataConfig) -> str:
    """The `oelm-ray prepare` command that builds prepared_dir(cfg): every data field off its default."""
    base = asdict(DataConfig())
    sets = [
        shlex.quote(f"{k}={v}")
        for k, v in asdict(cfg).items()
        if k in ("dataset", "tokenizer") or k != "data_dir" and v != base[k]
    ]
    where = f" --data-dir {shlex.quote(cfg.data_dir)}" if cfg.data_dir != base["data_dir"] else ""
    return f"oelm-ray prepare --set {' '.join(sets)}{where}"


# ---------------------------------------------------------------------------------------------
# loading and verification


@dataclass
class Prepared:
    train: np.memmap
    val: np.memmap
    meta: dict
    path: Path
    vocab_size: int


def load_prepared(cfg: DataConfig, verify: str = "quick") -> Prepared:
    """Memory-map the prepared train/val tokens of cfg after verifying them (full, quick or none)."""
    path = prepared_dir(cfg)
    if not (path / "meta.json").exists():
        raise DataError(f"no prepared data at {path}: run `{_prepare_hint(cfg)}` first")
    try:
        meta = verify_prepared(path, verify, tokenizer=cfg.tokenizer)
    except DataError as e:
        raise DataError(f"{e}; delete {path} and run `{_prepare_hint(cfg)} --force`") from e
    dtype = np.dtype(meta["dtype"])
    train, val = (np.memmap(path / f"{s}.bin", dtype=dtype, mode="r") for s in SPLITS)
    return Prepared(train=train, val=val, meta=meta, path=path, vocab_size=meta["vocab_size"])


def verify_prepared(path: Path | str, mode: str = "quick", tokenizer: str | None = None) -> dict:
    """Check a prepared folder and return its meta; DataError says what is wrong.

    mode "none" checks file sizes against the token counts; "quick" also hashes files under
    64 MB whole and larger ones by fixed sample chunks; "full" hashes every file whole.
    """
    if mode not in ("none", "quick", "full"):
        raise ValueError(f"verify mode {mode!r} must be none, quick or full")
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        # name -> (tokens, sha256, sample sha256)
        expect = {
            f"{s}.bin": (
                int(meta[f"{s}_tokens"]),
                meta["files"][f"{s}.bin"]["sha256"],
                meta["files"][f"{s}.bin"]["sample_sha256"],
            )
            for s in SPLITS
        }
    except FileNotFoundError:
        raise DataError(f"{path}/meta.json is missing (an unfinished or foreign folder)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}/meta.json is unreadable ({e!r})") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} has format version {meta.get('format_version')}, this code reads {FORMAT_VERSION}")
    if tokenizer is not None and meta.get("tokenizer") != tokenizer:
        raise DataError(f"{path} was prepared with tokenizer {meta.get('tokenizer')!r}, not {tokenizer!r}")
    for name, (tokens, sha, sample_sha) in expect.items():
        f = path / name
        want = tokens * dtype.itemsize
        size = f.stat().st_size if f.exists() else None
        if size != want:
            raise DataError(
                f"{f} is {'missing' if size is None else f'{size} bytes'}, expected {want} "
                f"({tokens} {dtype.name} tokens): truncated or incomplete"
            )
        if mode == "full" or (mode == "quick" and size < QUICK_FULL_HASH_BYTES):
            ok = _file_sha256(f) == sha
        elif mode == "quick":
            ok = sample_sha256(f, size) == sample_sha
        else:
            ok = True
        if not ok:
            raise DataError(f"{f} fails its sha256 checksum: the file is corrupted")
    return meta


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def sample_sha256(path: Path, size: int) -> str:
    """sha256 of the size and a few fixed, evenly spaced chunks: cheap to check on huge files."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for offset in np.linspace(0, max(0, size - SAMPLE_CHUNK_BYTES), SAMPLE_CHUNKS, dtype=np.int64):
            f.seek(int(offset))
            h.update(f.read(SAMPLE_CHUNK_BYTES))
    return h.hexdigest()
