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
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oelm_ray.core import corpora, data, prepared
from oelm_ray.core.config import DataConfig
from oelm_ray.core.corpora import DataError
from oelm_ray.core.stories import generate_stories, split_seed


def small_cfg(tmp_path: Path, **kw) -> DataConfig:
    kw.setdefault("stories_mb", 0.2)
    return DataConfig(data_dir=str(tmp_path / "data"), **kw)


def decoded_docs(cfg: DataConfig, split: str) -> list[str]:
    """Decode a prepared split back into documents, splitting at end-of-text."""
    p = prepared.load_prepared(cfg, verify="full")
    enc = prepared.get_tokenizer(cfg)
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
    enc = prepared.get_tokenizer(DataConfig(tokenizer="bytes"))
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
        prepared.get_tokenizer(DataConfig(tokenizer="gpt2", gpt2_ranks=str(fake)))
    monkeypatch.setenv("OELM_GPT2_RANKS", str(tmp_path / "missing.tiktoken"))
    with pytest.raises(DataError, match="does not exist"):
        prepared.get_tokenizer(DataConfig(tokenizer="gpt2"))


def test_gpt2_real_ranks(tmp_path, gpt2_ranks):
    enc = prepared.get_tokenizer(DataConfig(tokenizer="gpt2", gpt2_ranks=str(gpt2_ranks)))
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
    assert prepared.prepared_dir(cfg).name == "stories-0.2mb-s1234-bytes"
    for split in ("train", "val"):
        assert decoded_docs(cfg, split) == expected_docs(cfg, split)
    p = prepared.load_prepared(cfg)
    assert len(p.train) == meta["train_tokens"] and len(p.val) == meta["val_tokens"]
    assert p.vocab_size == 257 and p.train.dtype == np.uint16
    assert 200_000 <= meta["train_tokens"] - meta["train_docs"] < 202_000  # bytes of text
    assert 100_000 <= meta["val_tokens"] - meta["val_docs"] < 102_000


def test_prepare_max_train_tokens(tmp_path):
    cfg = small_cfg(tmp_path, max_train_tokens=5000)
    meta = data.prepare(cfg, progress=False)
    assert meta["train_tokens"] == 5000 and meta["val_tokens"] > 100_000
    assert prepared.prepared_dir(cfg).name.endswith("-max5000-bytes")


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
    assert prepared.prepared_dir(cfg).name.startswith("corpus-")


def test_local_file_missing(tmp_path):
    cfg = small_cfg(tmp_path, dataset=str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        data.prepare(cfg, progress=False)


def test_prepare_idempotent(tmp_path):
    cfg = small_cfg(tmp_path)
    data.prepare(cfg, progress=False)
    out = prepared.prepared_dir(cfg)
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    t0 = time.perf_counter()
    data.prepare(cfg, progress=False)
    assert time.perf_counter() - t0 < 0.5
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == mtimes


HOLD_THE_LOCK = """
import sys
from pathlib import Path
from oelm_ray.core.data import _locked
with _locked(Path(sys.argv[1]), None):
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.timeout(120)
def test_a_prepare_waiting_for_another_processs_lock_says_who_holds_it_and_repeats(tmp_path, monkeypatch):
    """Another process holds the corpus's build lock: it records who it is beside the lock; the waiting
    prepare names it, says every WAIT_LOG_S that it still waits, builds once the lock is free, and leaves no
    record behind."""
    cfg = small_cfg(tmp_path)
    out = prepared.prepared_dir(cfg)
    out.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        record = json.loads(Path(f"{out}.lock.json").read_text())
        assert record["pid"] == holder.pid and record["host"] == socket.gethostname() and record["corpus"] == out.name
        assert "-c" in record["command"] and record["since"].endswith("+00:00")
        monkeypatch.setattr(data, "WAIT_LOG_S", 0.3)
        lines, result = [], {}
        waiter = threading.Thread(
            target=lambda: result.update(meta=data.prepare(cfg, progress=False, log=lines.append))
        )
        waiter.start()
        deadline = time.monotonic() + 30
        while sum("still waiting" in line for line in lines) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not out.exists() and waiter.is_alive()
    finally:
        holder.communicate("release\n", timeout=30)
    waiter.join(60)
    since = record["since"][11:16]
    who = f"pid {holder.pid} on host {socket.gethostname()}, since {since} UTC"
    assert lines[0] == (
        f"prepare {out.name}: another process ({who}) is preparing it (lock {out}.lock): waiting for it"
    )
    still = [line for line in lines[1:] if "still waiting" in line]
    assert len(still) >= 3 and all(
        re.fullmatch(rf"prepare {out.name}: still waiting for it \(0m0\ds so far; held by {re.escape(who)}\)", line)
        for line in still
    )
    assert result["meta"]["train_tokens"] > 0 and out.exists()
    assert not Path(f"{out}.lock.json").exists()


def test_load_missing_names_the_prepare_command_that_builds_it(tmp_path):
    import shlex

    from oelm_ray import cli
    from oelm_ray.core import config as C
    from oelm_ray.core.options import parse_sets

    cfg = small_cfg(tmp_path, stories_seed=7)
    with pytest.raises(DataError, match="oelm-ray prepare --set dataset=stories tokenizer=bytes stories_mb=0.2 ") as e:
        prepared.load_prepared(cfg)
    hint = shlex.split(str(e.value).split("`")[1])
    args = cli.build_parser().parse_args(hint[1:])
    assert prepared.prepared_dir(C.make_config(args.preset, parse_sets(args, ("data",))).data) == prepared.prepared_dir(
        cfg
    )


def test_corrupted_truncated_and_foreign(tmp_path):
    cfg = small_cfg(tmp_path)
    data.prepare(cfg, progress=False)
    out = prepared.prepared_dir(cfg)
    train = out / "train.bin"
    good = train.read_bytes()

    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    train.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match="checksum"):
        prepared.load_prepared(cfg)
    with pytest.raises(DataError, match="delete"):
        data.prepare(cfg, progress=False)  # never silently overwrite
    prepared.load_prepared(cfg, verify="none")  # sizes still match

    train.write_bytes(good[:-2])
    with pytest.raises(DataError, match="truncated"):
        prepared.load_prepared(cfg, verify="none")

    train.write_bytes(good)
    meta_path = out / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "tokenizer": "gpt2"}))
    with pytest.raises(DataError, match="tokenizer"):
        prepared.load_prepared(cfg)

    meta_path.write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        prepared.load_prepared(cfg)

    data.prepare(cfg, progress=False, force=True)
    prepared.load_prepared(cfg, verify="full")
    assert [f.name for f in (tmp_path / "data").iterdir() if f.is_dir()] == [out.name]


def test_quick_verify_samples_large_files(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path)
    data.prepare(cfg, progress=False)
    # pretend the files are huge: quick mode then checks only the sampled chunks
    monkeypatch.setattr(prepared, "QUICK_FULL_HASH_BYTES", 1)
    train = prepared.prepared_dir(cfg) / "train.bin"
    raw = bytearray(train.read_bytes())
    raw[0] ^= 0xFF  # the first chunk is always sampled
    train.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="checksum"):
        prepared.load_prepared(cfg, verify="quick")


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
    assert prepared.prepared_dir(cfg).name == "openwebtext-val0.1-bytes"


def test_hub_dir_wikitext_articles(tmp_path):
    hub = tmp_path / "hub"
    rows = [
        "",
        " = Alpha = \n",
        "",
        " Alpha text . \n",
        " = = Part = = \n",
        " more . \n",
        " = Beta = \n",
        " Beta text . \n",
    ]
    _hub_parquet(hub / "wikitext-103-raw-v1" / "train-00000-of-00001.parquet", rows)
    _hub_parquet(hub / "wikitext-103-raw-v1" / "validation-00000-of-00001.parquet", ["", " = Gamma = \n", " g . \n"])
    cfg = small_cfg(tmp_path, dataset="wikitext103", hub_dir=str(hub))
    data.prepare(cfg, progress=False)
    # rows join into one document per top-level heading; empty rows vanish
    assert decoded_docs(cfg, "train") == [
        " = Alpha = \n Alpha text . \n = = Part = = \n more . \n",
        " = Beta = \n Beta text . \n",
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


# ---------------------------------------------------------------------------------------------
# the parallel, resumable build against the serial algorithm it replaced


def reference_prepare(cfg: DataConfig) -> dict:
    """The serial prepare this project had before worker processes (one Python list per document,
    batches of data.BATCH_CHARS characters): sha256 of each split's bytes and its counts."""
    import hashlib

    enc, src, limit = prepared.get_tokenizer(cfg), corpora.corpus(cfg), cfg.max_train_tokens
    dtype = prepared.token_dtype(enc.n_vocab)
    out = {s: hashlib.sha256() for s in prepared.SPLITS}
    tokens, docs = dict.fromkeys(prepared.SPLITS, 0), dict.fromkeys(prepared.SPLITS, 0)

    def full() -> bool:
        return bool(limit) and tokens["train"] >= limit

    def flush(batch):
        for split in prepared.SPLITS:
            texts = [t for s, t in batch if s == split]
            if texts and not (split == "train" and full()):
                flat = [x for t in texts for x in enc.encode_ordinary(t) + [enc.eot_token]]
                if split == "train" and limit:
                    flat = flat[: limit - tokens["train"]]
                out[split].update(np.array(flat, dtype=np.uint32).astype(dtype).tobytes())
                tokens[split] += len(flat)
                docs[split] += len(texts)

    batch, chars = [], 0
    for split, text in src.docs():
        if split == "train" and full():
            if src.val_last:
                continue
            break
        batch.append((split, text))
        chars += len(text)
        if chars >= data.BATCH_CHARS:
            flush(batch)
            batch, chars = [], 0
    if batch:
        flush(batch)
    return {"sha256": {s: h.hexdigest() for s, h in out.items()}, "tokens": tokens, "docs": docs}


def built(meta: dict) -> dict:
    return {
        "sha256": {s: meta["files"][f"{s}.bin"]["sha256"] for s in prepared.SPLITS},
        "tokens": {s: meta[f"{s}_tokens"] for s in prepared.SPLITS},
        "docs": {s: meta[f"{s}_docs"] for s in prepared.SPLITS},
    }


def test_cpu_preset_stories_tokens_unchanged(tmp_path):
    """The embedded default's corpus (cpu preset: 4 MB of stories, bytes): pinned to the bytes it had
    before worker processes, so its table stays bit-identical."""
    from oelm_ray.core.config import make_config

    meta = data.prepare(make_config("cpu", data_dir=str(tmp_path)).data, progress=False)
    assert meta["files"]["train.bin"]["sha256"] == "f8120caf5d3b1e26fc9e91c14d27b485e96afdfbf3f57cf876bddfb3c1595e2b"
    assert meta["files"]["val.bin"]["sha256"] == "d193c069a1f6d6860676cfb8173efd2cc2da540b6ea38fa65cb12eb83c39b46e"


def _stories_parquet(path: Path, nbytes: int, seed: int = 5) -> list[str]:
    docs = list(generate_stories(nbytes, seed))
    docs[3] = "naïve 日本語 🙂 and a literal <|endoftext|> inside a document"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": docs}), path)
    return docs


@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2"])
@pytest.mark.parametrize("case", ["local", "local-max", "hub-interleaved-max", "stories-max"])
def test_parallel_build_matches_serial_reference(tmp_path, monkeypatch, gpt2_ranks, tokenizer, case):
    """Worker processes from the second chunk on, many small chunks: the same bytes and counts as
    the serial algorithm, also where max_train_tokens cuts train (val after it, or interleaved)."""
    monkeypatch.setattr(data, "BATCH_CHARS", 20_000)
    monkeypatch.setattr(data, "POOL_AFTER_CHARS", 20_000)
    kw = {"tokenizer": tokenizer, "gpt2_ranks": str(gpt2_ranks)}
    if case.startswith("local"):
        _stories_parquet(tmp_path / "c.parquet", 400_000)
        kw.update(dataset=str(tmp_path / "c.parquet"), val_fraction=0.1)
    elif case.startswith("hub"):
        _stories_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet", 400_000)
        kw.update(dataset="openwebtext", hub_dir=str(tmp_path / "hub"), val_fraction=0.2)
    else:
        kw.update(stories_mb=0.4)
    if case.endswith("max"):
        kw["max_train_tokens"] = 55_555 if tokenizer == "gpt2" else 155_555
    cfg = small_cfg(tmp_path, **kw)
    meta = data.prepare(cfg, progress=False, workers=2)
    assert built(meta) == reference_prepare(cfg)
    assert prepared.verify_prepared(prepared.prepared_dir(cfg), "full", tokenizer=tokenizer)
    if case.endswith("max"):
        assert meta["train_tokens"] == kw["max_train_tokens"]


def test_lone_surrogates_encode_like_encode_ordinary(gpt2_ranks):
    for tok in ("bytes", "gpt2"):
        enc_cfg = data._encoder(DataConfig(tokenizer=tok, gpt2_ranks=str(gpt2_ranks)))
        texts = ["a\ud800b", "plain <|endoftext|> text", ""]
        (flat, ends), _ = data._encode_chunk(enc_cfg, (texts, []))
        enc = enc_cfg[0]
        want = [x for t in texts for x in enc.encode_ordinary(t) + [enc.eot_token]]
        assert flat.tolist() == want and ends[-1] == len(want)


# ---------------------------------------------------------------------------------------------
# killed, failing and slow builds

SLOW_PREPARE = """
import dataclasses, sys, time
from oelm_ray.core import corpora, data
from oelm_ray.core.config import DataConfig
data.BATCH_CHARS, data.POOL_AFTER_CHARS, data.COMMIT_SECONDS = 20_000, 20_000, 0.0
real = data.corpus
def trickle(docs):
    for d in docs:
        time.sleep(0.002)
        yield d
def slow(cfg):  # a stream that trickles: the kill lands mid-way
    c = real(cfg)
    resume = c.resume_docs and (lambda mark, marks: trickle(c.resume_docs(mark, marks)))
    return dataclasses.replace(c, docs=lambda: trickle(c.docs()), resume_docs=resume)
data.corpus = slow
cfg = DataConfig(dataset=sys.argv[1], hub_dir=sys.argv[3], data_dir=sys.argv[2], val_fraction=0.1)
data.prepare(cfg, progress=False, workers=2)
"""


@pytest.mark.parametrize("source", ["local", "hub"])
def test_killed_prepare_resumes_to_identical_files(tmp_path, source):
    """SIGKILL a prepare (its worker processes too) twice at different points; the same call then
    continues from its record and ends with the bytes of an uninterrupted build. A streamed hub
    corpus restarts at its recorded stream position (the documents before it are not read again)."""
    import psutil

    if source == "local":
        dataset, hub_dir = str(tmp_path / "c.parquet"), ""
        _stories_parquet(tmp_path / "c.parquet", 1_500_000)
    else:
        dataset, hub_dir = "openwebtext", str(tmp_path / "hub")
        for i in range(3):
            _stories_parquet(tmp_path / "hub" / "data" / f"train-0000{i}-of-00003.parquet", 500_000, seed=i)
    src = dataset
    whole = small_cfg(tmp_path, dataset=dataset, hub_dir=hub_dir, val_fraction=0.1)
    want = built(data.prepare(whole, progress=False))
    cfg = DataConfig(dataset=dataset, hub_dir=hub_dir, data_dir=str(tmp_path / "killed"), val_fraction=0.1)
    out = prepared.prepared_dir(cfg)
    record = out.parent / f".{out.name}.partial.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done_at = []
    for fraction in (0.25, 0.6):
        proc = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE, src, cfg.data_dir, hub_dir], env=env)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                rec = json.loads(record.read_text()) if record.exists() else {"docs": 0}
                if rec["docs"] >= fraction * want["docs"]["train"]:
                    break
                assert proc.poll() is None, "the prepare ended before it could be killed"
                time.sleep(0.02)
            else:
                pytest.fail("the prepare recorded no progress within 60 s")
            workers = psutil.Process(proc.pid).children(recursive=True)
            assert workers, "the build never started its worker processes"
            proc.kill()
            proc.wait(10)
        finally:
            proc.kill()
        assert not out.exists()
        done_at.append(json.loads(record.read_text())["docs"])
        # the orphaned workers leave by themselves
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"worker processes {[p.pid for p in alive]} outlived their killed parent"
    assert done_at[0] < done_at[1] < want["docs"]["train"] + want["docs"]["val"]
    lines = []
    meta = data.prepare(cfg, progress=False, workers=2, log=lines.append)
    assert meta["resumed_at_docs"] >= done_at[1]
    assert any("resuming after" in line for line in lines), lines
    if source == "hub":
        rec_mark = re.search(r"the stream starts at document ([\d,]+)", lines[0])
        assert rec_mark and 1000 <= int(rec_mark[1].replace(",", "")) <= done_at[1], lines[0]
    assert built(meta) == want
    # the record and the half-built folder are gone: the folder became the prepared one
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, out.name + ".lock"])


class _Flaky:
    """A corpus whose stream raises `error` on its first `fails` passes: at document `after` x the
    pass's number (each pass gets further), or, stuck, at document `after` every time."""

    def __init__(self, real: corpora.Corpus, after: int, fails: int, error: Exception, stuck: bool = False):
        self.real, self.after, self.fails, self.error, self.stuck, self.passes = real, after, fails, error, stuck, 0

    def docs(self):
        self.passes += 1
        at = self.after * (1 if self.stuck else self.passes)
        for i, d in enumerate(self.real.docs()):
            if self.passes <= self.fails and i == at:
                raise self.error
            yield d


def _flaky_corpus(monkeypatch, flaky_of):
    import dataclasses

    real = data.corpus
    made = {}

    def fake(cfg):
        c = real(cfg)
        f = made.setdefault("f", flaky_of(c))
        return dataclasses.replace(c, docs=f.docs)

    monkeypatch.setattr(data, "corpus", fake)
    return made


def test_failing_stream_is_retried_then_fails_with_how_to_continue(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BATCH_CHARS", 20_000)
    monkeypatch.setattr(data, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    src = tmp_path / "c.parquet"
    _stories_parquet(src, 300_000)
    cfg = small_cfg(tmp_path, dataset=str(src), val_fraction=0.1)
    want = reference_prepare(cfg)

    # two network errors mid-way: retried, each pass continuing where the last one stopped
    made = _flaky_corpus(monkeypatch, lambda c: _Flaky(c, 100, 2, ConnectionError("connection reset by peer")))
    lines = []
    meta = data.prepare(cfg, progress=False, log=lines.append)
    assert built(meta) == want and made["f"].passes == 3
    assert sum("retry" in line for line in lines) == 2 and "ConnectionError" in lines[0]
    monkeypatch.undo()

    # failing every time: bounded retries, then one message naming the corpus, what is done, what to do
    monkeypatch.setattr(data, "BATCH_CHARS", 20_000)
    monkeypatch.setattr(data, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    cfg2 = small_cfg(tmp_path / "b", dataset=str(src), val_fraction=0.1)
    made = _flaky_corpus(monkeypatch, lambda c: _Flaky(c, 50, 10**6, TimeoutError("read timed out"), stuck=True))
    with pytest.raises(
        DataError,
        match=r"reading corpus .*c\.parquet.* failed after 4 tries: read timed out\. "
        r"50 documents .* are done .* run the same command again",
    ):
        data.prepare(cfg2, progress=False)
    assert made["f"].passes == 4  # the first pass read 50, the retries none: three retries in a row
    monkeypatch.undo()
    meta = data.prepare(cfg2, progress=False)  # the stream works again: continues from document 50
    assert meta["resumed_at_docs"] == 50 and built(meta) == want

    # not a network error: no retry
    cfg3 = small_cfg(tmp_path / "c", dataset=str(src), val_fraction=0.1)
    made = _flaky_corpus(monkeypatch, lambda c: _Flaky(c, 50, 10**6, ValueError("bad row"), stuck=True))
    with pytest.raises(DataError, match="failed: bad row.*run the same command again"):
        data.prepare(cfg3, progress=False)
    assert made["f"].passes == 1


def test_progress_has_a_total_and_an_eta(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "BATCH_CHARS", 20_000)
    monkeypatch.setattr(data, "LOG_SECONDS", 0.0)
    hub = tmp_path / "hub"
    docs = _stories_parquet(hub / "data" / "train-00000-of-00001.parquet", 300_000)
    lines = []
    cfg = small_cfg(tmp_path, dataset="openwebtext", hub_dir=str(hub), val_fraction=0.1)
    data.prepare(cfg, progress=False, log=lines.append)
    n = len(docs)
    assert len(lines) > 3
    assert re.search(
        rf"[\d,]+/{n:,} documents \(\d+%\), [\d.,]+M tokens \(~[\d,.]+M in all, estimated\), "
        r"[\d.]+M tokens/s, ETA \d+m\d\ds",
        lines[1],
    ), lines
    assert f"{n:,}/{n:,} documents" in lines[-1] and "done in" in lines[-1]


@pytest.mark.slow
def test_prepare_speed_smoke(tmp_path, gpt2_ranks):
    """benchmarks/prepare_speed.py --smoke: both ways run on ~20 MB, agree on the tokens, and it
    prints tokens/s, peak RSS and the ratio; its work folder is deleted."""
    root = Path(__file__).resolve().parents[2]
    work = tmp_path / "work"
    p = subprocess.run(
        [
            sys.executable,
            "benchmarks/prepare_speed.py",
            "--smoke",
            "--gpt2-ranks",
            str(gpt2_ranks),
            "--work",
            str(work),
            "--timeout",
            "300",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    rows = {
        m: re.search(rf"^{m}\s+([\d,]+) tokens .* ([\d.]+) M tokens/s peak RSS\s+(\d+) MB", p.stdout, re.M)
        for m in ("ours", "nanogpt")
    }
    assert all(rows.values()), p.stdout
    assert rows["ours"][1] == rows["nanogpt"][1] and int(rows["ours"][1].replace(",", "")) > 5_000_000
    assert all(float(r[2]) > 0 and int(r[3]) > 0 for r in rows.values())
    assert re.search(r"ratio ours/nanogpt \(median tokens/s\): [\d.]+", p.stdout), p.stdout
    assert not work.exists()


def test_a_stuck_tokenizer_worker_ends_the_build_within_the_chunk_timeout(tmp_path, monkeypatch):
    """A worker that never returns its chunk: the build fails with the timeout's one message, soon after
    the timeout, instead of waiting on the stuck process while it shuts the pool down."""
    import stuck_worker

    monkeypatch.setattr(data, "BATCH_CHARS", 20_000)
    monkeypatch.setattr(data, "POOL_AFTER_CHARS", 20_000)
    monkeypatch.setattr(data, "CHUNK_TIMEOUT_S", 3.0)
    monkeypatch.setattr(data, "_encode_in_worker", stuck_worker.encode)
    _stories_parquet(tmp_path / "c.parquet", 200_000)
    cfg = small_cfg(tmp_path, dataset=str(tmp_path / "c.parquet"), val_fraction=0.1)
    t = time.monotonic()
    with pytest.raises(DataError, match="a tokenizer worker took over 3.0 s on one chunk"):
        data.prepare(cfg, progress=False, workers=1)
    assert time.monotonic() - t < 60, "waited on the stuck worker"
