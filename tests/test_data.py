"""Data pipeline: stories, tokenizers, prepare/load round trips, concurrency and failure modes."""

from __future__ import annotations

import base64
import collections
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oelm_ray.core import corpora, data
from oelm_ray.core.config import DataConfig
from oelm_ray.core.corpora import DataError
from oelm_ray.core.stories import generate_stories, split_seed


def small_cfg(tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("stories_mb", 0.2)
    return DataConfig(data_dir=str(tmp_path / "data"), **kw)


def decoded_docs(cfg: DataConfig, split: str) -> list[str]:
    """Decode a prepared split back into documents, splitting at end-of-text."""
    p = data.load_prepared(cfg, verify="full")
    enc = data.get_tokenizer(cfg)
    tokens = np.asarray(getattr(p, split), dtype=np.int64)
    ends = np.flatnonzero(tokens == enc.eot_token)
    assert len(ends) and ends[-1] == len(tokens) - 1, "every document ends with end-of-text"
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [enc.decode(tokens[a:b].tolist()) for a, b in zip(starts, ends)]


def expected_docs(cfg: DataConfig, split: str) -> list[str]:
    return [t for s, t in corpora.iter_documents(cfg) if s == split]


# ---------------------------------------------------------------------------------------------
# stories


def test_stories_deterministic():
    a = list(generate_stories(50_000, seed=1))
    assert a == list(generate_stories(50_000, seed=1))
    assert a != list(generate_stories(50_000, seed=2))
    assert 50_000 <= sum(len(t.encode()) for t in a) < 52_000
    assert all(300 <= len(t) <= 1500 for t in a)
    assert split_seed(1, "train") != split_seed(1, "val")


def test_stories_invented_words_recur():
    stories = list(generate_stories(300_000, seed=3))
    words = [re.findall(r"[A-Za-z]+", t) for t in stories]
    doc_freq = collections.Counter(w for ws in words for w in set(ws))
    # invented words are rare across stories; within a story they must come back
    rare = {w for w, n in doc_freq.items() if n <= 3}
    recurring = [max((ws.count(w) for w in set(ws) & rare), default=0) >= 2 for ws in words]
    assert sum(recurring) >= 0.9 * len(stories)
    assert len(set(stories)) == len(stories)


def test_val_stories_unseen(tmp_path):
    cfg = small_cfg(tmp_path)
    train = set(expected_docs(cfg, "train"))
    val = expected_docs(cfg, "val")
    assert len(val) > 50 and not train & set(val)


# ---------------------------------------------------------------------------------------------
# tokenizers


def test_bytes_tokenizer_roundtrip():
    enc = data.get_tokenizer(DataConfig(tokenizer="bytes"))
    text = "héllo wörld ✓ 日本語 🙂\n\n\ttabs  and <|endoftext|> as text"
    toks = enc.encode_ordinary(text)
    assert toks == list(text.encode())
    assert enc.decode(toks) == text
    assert enc.n_vocab == 257 and enc.eot_token == 256


def _fake_ranks(path: Path) -> Path:
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    return path


def test_gpt2_ranks_wrong_hash(tmp_path, monkeypatch):
    fake = _fake_ranks(tmp_path / "gpt2.tiktoken")
    with pytest.raises(DataError, match="sha256"):
        data.get_tokenizer(DataConfig(tokenizer="gpt2", gpt2_ranks=str(fake)))
    monkeypatch.setenv("OELM_GPT2_RANKS", str(tmp_path / "missing.tiktoken"))
    with pytest.raises(DataError, match="does not exist"):
        data.get_tokenizer(DataConfig(tokenizer="gpt2"))


def test_gpt2_real_ranks(tmp_path, gpt2_ranks):
    enc = data.get_tokenizer(DataConfig(tokenizer="gpt2", gpt2_ranks=str(gpt2_ranks)))
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.decode(enc.encode_ordinary("Hello world")) == "Hello world"
    cfg = small_cfg(tmp_path, tokenizer="gpt2", stories_mb=0.05, gpt2_ranks=str(gpt2_ranks))
    meta = data.prepare(cfg, progress=False)
    assert meta["dtype"] == "uint16" and meta["eot_token"] == 50256
    assert decoded_docs(cfg, "val") == expected_docs(cfg, "val")


# ---------------------------------------------------------------------------------------------
# prepare / load


def test_prepare_stories_roundtrip(tmp_path):
    cfg = small_cfg(tmp_path)
    meta = data.prepare(cfg, progress=False)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 257 and meta["eot_token"] == 256
    assert data.prepared_dir(cfg).name == "stories-0.2mb-s1234-bytes"
    for split in ("train", "val"):
        assert decoded_docs(cfg, split) == expected_docs(cfg, split)
    p = data.load_prepared(cfg)
    assert len(p.train) == meta["train_tokens"] and len(p.val) == meta["val_tokens"]
    assert p.vocab_size == 257 and p.train.dtype == np.uint16
    assert 200_000 <= meta["train_tokens"] - meta["train_docs"] < 202_000  # bytes of text
    assert 100_000 <= meta["val_tokens"] - meta["val_docs"] < 102_000


def test_prepare_max_train_tokens(tmp_path):
    cfg = small_cfg(tmp_path, max_train_tokens=5000)
    meta = data.prepare(cfg, progress=False)
    assert meta["train_tokens"] == 5000 and meta["val_tokens"] > 100_000
    assert data.prepared_dir(cfg).name.endswith("-max5000-bytes")


def _write_local(path: Path, docs: list[str]) -> None:
    if path.suffix == ".txt":
        path.write_text("\n\n".join(docs) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    else:
        pq.write_table(pa.table({"text": docs}), path)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet"])
def test_prepare_local_file_roundtrip(tmp_path, suffix):
    docs = [f"Document {i}: the {'ünïcode ' * (i % 3)}story of Zorblin.\nLine two of {i}." for i in range(100)]
    path = tmp_path / f"corpus{suffix}"
    _write_local(path, docs)
    cfg = small_cfg(tmp_path, dataset=str(path), val_fraction=0.1)
    meta = data.prepare(cfg, progress=False)
    assert meta["train_docs"] == 90 and meta["val_docs"] == 10
    assert decoded_docs(cfg, "train") == docs[:90]
    assert decoded_docs(cfg, "val") == docs[90:]
    assert data.prepared_dir(cfg).name.startswith("corpus-")


def test_local_file_missing(tmp_path):
    cfg = small_cfg(tmp_path, dataset=str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        data.prepare(cfg, progress=False)


def test_prepare_idempotent(tmp_path):
    cfg = small_cfg(tmp_path)
    data.prepare(cfg, progress=False)
    out = data.prepared_dir(cfg)
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    t0 = time.perf_counter()
    data.prepare(cfg, progress=False)
    assert time.perf_counter() - t0 < 0.5
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == mtimes


def test_load_missing(tmp_path):
    with pytest.raises(DataError, match="oelm-ray prepare --dataset stories"):
        data.load_prepared(small_cfg(tmp_path))


def test_corrupted_truncated_and_foreign(tmp_path):
    cfg = small_cfg(tmp_path)
    data.prepare(cfg, progress=False)
    out = data.prepared_dir(cfg)
    train = out / "train.bin"
    good = train.read_bytes()

    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    train.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match="checksum"):
        data.load_prepared(cfg)
    with pytest.raises(DataError, match="delete"):
        data.prepare(cfg, progress=False)  # never silently overwrite
    data.load_prepared(cfg, verify="none")  # sizes still match

    train.write_bytes(good[:-2])
    with pytest.raises(DataError, match="truncated"):
        data.load_prepared(cfg, verify="none")

    train.write_bytes(good)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "tokenizer": "gpt2"}))
    with pytest.raises(DataError, match="tokenizer"):
        data.load_prepared(cfg)

    meta_path.write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        data.load_prepared(cfg)

    data.prepare(cfg, progress=False, force=True)
    data.load_prepared(cfg, verify="full")
    assert [f.name for f in (tmp_path / "data").iterdir() if f.is_dir()] == [out.name]


def test_quick_verify_samples_large_files(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path)
    data.prepare(cfg, progress=False)
    # pretend the files are huge: quick mode then checks only the sampled chunks
    monkeypatch.setattr(data, "QUICK_FULL_HASH_BYTES", 1)
    train = data.prepared_dir(cfg) / "train.bin"
    raw = bytearray(train.read_bytes())
    raw[0] ^= 0xFF  # the first chunk is always sampled
    train.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="checksum"):
        data.load_prepared(cfg, verify="quick")


# ---------------------------------------------------------------------------------------------
# hub corpora


def _hub_parquet(path: Path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": texts}), path)


def test_hub_dir_tinystories(tmp_path):
    hub = tmp_path / "hub"
    train = [f"Once upon a time Zib {i} had a frobnet." for i in range(60)]
    val = [f"Val story {i}." for i in range(7)]
    _hub_parquet(hub / "data" / "train-00000-of-00002.parquet", train[:30])
    _hub_parquet(hub / "data" / "train-00001-of-00002.parquet", train[30:])
    _hub_parquet(hub / "data" / "validation-00000-of-00001.parquet", val)
    cfg = small_cfg(tmp_path, dataset="tinystories", hub_dir=str(hub))
    meta = data.prepare(cfg, progress=False)
    assert meta["source"] == str(hub)
    assert decoded_docs(cfg, "train") == train
    assert decoded_docs(cfg, "val") == val


def test_hub_dir_openwebtext_holds_out_val(tmp_path):
    hub = tmp_path / "hub"
    docs = [f"Web page {i} about things." for i in range(500)]
    _hub_parquet(hub / "data" / "train-00000-of-00001.parquet", docs)
    cfg = small_cfg(tmp_path, dataset="openwebtext", hub_dir=str(hub), val_fraction=0.1)
    data.prepare(cfg, progress=False)
    train, val = decoded_docs(cfg, "train"), decoded_docs(cfg, "val")
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert 45 <= len(val) <= 55
    assert data.prepared_dir(cfg).name == "openwebtext-val0.1-bytes"


def test_hub_dir_wikitext_articles(tmp_path):
    hub = tmp_path / "hub"
    rows = ["", " = Alpha = \n", "", " Alpha text . \n", " = = Part = = \n", " more . \n",
            " = Beta = \n", " Beta text . \n"]
    _hub_parquet(hub / "wikitext-103-raw-v1" / "train-00000-of-00001.parquet", rows)
    _hub_parquet(hub / "wikitext-103-raw-v1" / "validation-00000-of-00001.parquet", ["", " = Gamma = \n", " g . \n"])
    cfg = small_cfg(tmp_path, dataset="wikitext103", hub_dir=str(hub))
    data.prepare(cfg, progress=False)
    # rows join into one document per top-level heading; empty rows vanish
    assert decoded_docs(cfg, "train") == [
        " = Alpha = \n Alpha text . \n = = Part = = \n more . \n", " = Beta = \n Beta text . \n",
    ]
    assert decoded_docs(cfg, "val") == [" = Gamma = \n g . \n"]


def test_hub_dir_missing_files(tmp_path):
    cfg = small_cfg(tmp_path, dataset="tinystories", hub_dir=str(tmp_path / "empty"))
    with pytest.raises(DataError, match="validation-\\*.parquet|train-\\*.parquet"):
        data.prepare(cfg, progress=False)


def test_hub_unreachable_is_quick(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    # conftest sets HF_HUB_OFFLINE=1, which skips the probe: this test is about the online path
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    # the real probe, aimed at a loopback port nobody listens on (tests talk to 127.0.0.1 only)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed}")
    probes = []
    real = corpora._hub_reachable
    monkeypatch.setattr(corpora, "_hub_reachable", lambda timeout=3.0: probes.append(1) or real(timeout))
    cfg = small_cfg(tmp_path, dataset="wikitext103")
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="hub is unreachable.*--hub-dir"):
        data.prepare(cfg, progress=False)
    assert time.perf_counter() - t0 < 5
    assert probes == [1], "the reachability probe never ran"
    assert not any((tmp_path / "data").glob("*/"))
    with socket.socket() as s:  # and the same probe says yes where something listens
        s.bind(("127.0.0.1", 0))
        s.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
        assert real() is True


def test_hub_offline_mode(tmp_path):
    # a fresh interpreter, so datasets reads HF_HUB_OFFLINE at import; an empty HF_HOME means no cache
    code = (
        "from oelm_ray.core import data; from oelm_ray.core.config import DataConfig\n"
        f"try: data.prepare(DataConfig(dataset='tinystories', data_dir={str(tmp_path / 'd')!r}), progress=False)\n"
        "except data.DataError as e: print('DataError:', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - t0 < 20
    assert "DataError:" in out.stdout and "--hub-dir" in out.stdout, out.stdout + out.stderr
