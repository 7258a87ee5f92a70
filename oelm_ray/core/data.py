"""Preparing a corpus: its documents tokenized into the prepared token files (`prepared.py`).

A corpus is read as a stream of (split, text) documents, cut into chunks that worker processes
tokenize while the next ones are read, and written in stream order to raw token files (train.bin,
val.bin, then meta.json: `prepared.py` has the layout), each document followed by the end-of-text
token, nanoGPT style.

Preparing is idempotent and safe to run from many processes at once (one builds under a file
lock into a temp folder that is renamed into place; the others wait, then verify and reuse it),
so every trial of a sweep may call `prepare` on shared storage. A build records every few seconds
how far it got, so a killed one continues there (to the same bytes) and a failing stream is
retried from there. `prepared.load_prepared` reads the files back.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import json
import multiprocessing
import os
import shlex
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken
from filelock import FileLock, Timeout
from tqdm import tqdm

from .config import VOCAB_SIZES, DataConfig
from .corpora import DataError, check_readable, corpus
from .io import fsync_dir, one_line, write_json
from .prepared import (
    FORMAT_VERSION,
    SPLITS,
    get_tokenizer,
    prepared_dir,
    sample_sha256,
    token_dtype,
    verify_prepared,
)

BATCH_CHARS = 4 << 20  # text per tokenized chunk (the unit of work, of ordering and of resuming)
POOL_AFTER_CHARS = 16 << 20  # tokenize in this process up to here: a small corpus never waits for workers to start
COMMIT_SECONDS = 5.0  # how often a build records what it has done (a killed build redoes at most this much)
LOG_SECONDS = 30.0  # how often `log` gets a progress line
RETRY_DELAYS = (2.0, 4.0, 8.0)  # seconds before each retry of a failing stream (consecutive failures)
CHUNK_TIMEOUT_S = 600.0  # one chunk's tokenizing in a worker, at most
WAIT_LOG_S = 300.0  # how often a prepare waiting for another process's build lock says it still waits


def prepare(
    cfg: DataConfig,
    progress: bool = True,
    force: bool = False,
    workers: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Tokenize cfg's corpus into prepared_dir(cfg) unless a verified copy exists; return its meta.

    Safe to call from many processes at once: one builds, the others wait and reuse. An existing
    folder that fails verification raises DataError; force=True rebuilds it (from the first
    document: a half-built copy is dropped too; a downloaded hub corpus stays in the datasets cache).

    A killed or failed build resumes, when called again, from its last recorded chunk and ends with
    the same bytes. `workers` tokenizer processes (default: the usable cores; 0 = in this process)
    take over once the corpus proves larger than POOL_AFTER_CHARS. `log` gets a line with the
    progress (and, where the corpus's size is known, its ETA) every LOG_SECONDS.
    """
    out = prepared_dir(cfg)
    if not force and out.exists():
        return _verify_existing(cfg, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out, log):
        if out.exists() and not force:  # another process built it while we waited
            return _verify_existing(cfg, out)
        tmp_prefix = f".{out.name}.tmp-"
        # temp folders of this name left by a killed prepare: nobody else writes them, we hold the lock
        for stale in out.parent.glob(tmp_prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial, record = out.parent / f".{out.name}.partial", out.parent / f".{out.name}.partial.json"
        if force:
            record.unlink(missing_ok=True)
        try:
            meta = _Build(cfg, partial, record, progress, workers, log).run()
        except BaseException:
            if not record.exists():  # nothing worth resuming from
                shutil.rmtree(partial, ignore_errors=True)
            raise
        os.chmod(partial, 0o755)  # others on shared storage must read it
        if out.exists():  # force: swap the new folder in, then drop the old one
            old = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(partial, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, out)
        fsync_dir(out.parent)
        record.unlink(missing_ok=True)
    return meta


@contextlib.contextmanager
def _locked(out: Path, log: Callable[[str], None] | None) -> Iterator[None]:
    """Hold out's build lock, with who holds it (host, pid, since when, command) in `<out>.lock.json`
    meanwhile. Where another process holds it, this one waits as long as that build takes, and `log`
    hears who that is, then again every WAIT_LOG_S."""
    lock, holder = FileLock(str(out) + ".lock"), Path(str(out) + ".lock.json")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        t0, who = time.monotonic(), _holder(holder)
        if log:
            log(
                f"prepare {out.name}: another process{f' ({who})' if who else ''} is preparing it "
                f"(lock {lock.lock_file}): waiting for it"
            )
        while True:
            try:
                lock.acquire(timeout=WAIT_LOG_S)
                break
            except Timeout:
                if log:
                    who = _holder(holder) or "another process"
                    log(
                        f"prepare {out.name}: still waiting for it ({fmt_secs(time.monotonic() - t0)} so far; held by {who})"
                    )
    try:
        since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        who = {"host": socket.gethostname(), "pid": os.getpid(), "since": since, "command": shlex.join(sys.argv)}
        try:
            write_json(holder, {**who, "corpus": out.name})
        except OSError:  # who holds the lock only makes the waiters' lines clearer
            pass
        yield
    finally:
        with contextlib.suppress(OSError):  # before the release, so never the next holder's record
            holder.unlink(missing_ok=True)
        lock.release()


def _holder(path: Path) -> str:
    """Who holds a build lock, from its `.lock.json` ('pid 123 on host h, since 14:02 UTC'); '' where there is
    none (a version that writes none holds it) or it cannot be read."""
    try:
        who = json.loads(path.read_text())
        since = datetime.datetime.fromisoformat(who["since"]).astimezone(datetime.timezone.utc)
        today = since.date() == datetime.datetime.now(datetime.timezone.utc).date()
        return f"pid {who['pid']} on host {who['host']}, since {since.strftime('%H:%M' if today else '%Y-%m-%d %H:%M')} UTC"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ""


def check_source(cfg: DataConfig) -> None:
    """Raise DataError now, with what to fix, where preparing cfg would fail before reading a document: its
    tokenizer, a missing local file or hub_dir, an unreachable hub. A sweep checks every corpus it has to
    prepare with this before any trial starts."""
    get_tokenizer(cfg)
    check_readable(cfg)


def _verify_existing(cfg: DataConfig, out: Path) -> dict:
    try:
        return verify_prepared(out, "quick", tokenizer=cfg.tokenizer)
    except DataError as e:
        raise DataError(f"{e}; delete {out} and prepare again, or prepare with force=True (--force)") from e


class _TokenWriter:
    """Appends token arrays to a raw file, hashing as it goes; reopens a resumed file at `tokens`."""

    def __init__(self, path: Path, dtype: np.dtype, limit: int = 0, tokens: int = 0, docs: int = 0):
        self.path, self.dtype, self.limit = path, dtype, limit
        self.sha = hashlib.sha256()
        self.tokens, self.docs = tokens, docs
        if not tokens:
            self.f = open(path, "wb")
            return
        self.f = open(path, "r+b")
        self.f.truncate(tokens * dtype.itemsize)  # what was written after the last record is redone
        while block := self.f.read(8 << 20):
            self.sha.update(block)

    @property
    def full(self) -> bool:
        return bool(self.limit) and self.tokens >= self.limit

    def write(self, tokens: np.ndarray, docs: int) -> int:
        if self.limit:
            tokens = tokens[: self.limit - self.tokens]
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self.f.write(data)
        self.sha.update(data)
        self.tokens += len(tokens)
        self.docs += docs
        return len(tokens)

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> dict[str, Any]:
        self.sync()
        self.f.close()
        size = self.path.stat().st_size
        return {"bytes": size, "sha256": self.sha.hexdigest(), "sample_sha256": sample_sha256(self.path, size)}


def _cores() -> int:
    """The cores this process may use (a Ray trial or a batch job may get fewer than the machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# tokenizing: the same function in this process and in the workers, one chunk of documents at a time

_worker_enc: tuple[tiktoken.Encoding, bool, np.dtype] | None = None


def _encoder(cfg: DataConfig) -> tuple[tiktoken.Encoding, bool, np.dtype]:
    return get_tokenizer(cfg), cfg.tokenizer == "bytes", token_dtype(VOCAB_SIZES[cfg.tokenizer])


def _init_worker(cfg: DataConfig, parent: int) -> None:
    global _worker_enc
    _worker_enc = _encoder(cfg)
    # a SIGKILLed parent never shuts its pool down: leave with it instead of waiting forever
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _encode_in_worker(texts: tuple[list[str], list[str]]) -> list[tuple[np.ndarray, np.ndarray]]:
    assert _worker_enc is not None
    return _encode_chunk(_worker_enc, texts)


def _encode_chunk(
    encoder: tuple[tiktoken.Encoding, bool, np.dtype], texts: tuple[list[str], ...]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per split: its documents' tokens, each followed by end-of-text, and each document's end offset."""
    enc, is_bytes, dtype = encoder
    out = []
    for docs in texts:
        arrays = [_doc_tokens(enc, is_bytes, t) for t in docs]
        ends = np.cumsum(np.fromiter((len(a) + 1 for a in arrays), np.int64, len(arrays)))
        flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype)
        pos = 0
        for a in arrays:
            flat[pos : pos + len(a)] = a
            flat[pos + len(a)] = enc.eot_token  # documents never run together
            pos += len(a) + 1
        out.append((flat, ends))
    return out


def _doc_tokens(enc: tiktoken.Encoding, is_bytes: bool, text: str) -> np.ndarray:
    # the same tokens as enc.encode_ordinary(text), without a Python int per token
    try:
        if is_bytes:  # one token per UTF-8 byte: the bytes encoding has no merges
            return np.frombuffer(text.encode("utf-8"), np.uint8)
        return enc.encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:  # lone surrogates: encode_ordinary repairs them
        return np.array(enc.encode_ordinary(text), np.uint32)


@dataclass
class _Chunk:
    texts: tuple[list[str], list[str]]  # train, val documents in stream order within each split
    end: int = 0  # stream documents read through this chunk's last one
    lead_val: int = 0  # val documents before the chunk's first train document
    chars: int = 0

    def add(self, split: str, text: str) -> None:
        if split == "val" and not self.texts[0]:
            self.lead_val += 1
        self.texts[SPLITS.index(split)].append(text)
        self.chars += len(text)


class _StreamFailed(Exception):
    """The corpus's document stream raised (its error is the __cause__)."""


def _guarded(docs: Iterator[tuple[str, str]]) -> Iterator[tuple[str, str]]:
    while True:
        try:
            item = next(docs)
        except StopIteration:
            return
        except Exception as e:
            raise _StreamFailed() from e
        yield item


def _retryable(e: BaseException | None) -> bool:
    """A network or read error somewhere in e's chain (not a missing file or bad input)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(e, (ConnectionError, TimeoutError, OSError)):
            return True
        e = e.__cause__ if e.__cause__ is not None or e.__suppress_context__ else e.__context__
    return False


def fmt_secs(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Build:
    """One build of a prepared folder: read -> tokenize (here, then in worker processes) -> write in
    stream order, recording (atomically, every COMMIT_SECONDS) how many documents are done."""

    def __init__(
        self,
        cfg: DataConfig,
        folder: Path,
        record: Path,
        progress: bool,
        workers: int | None,
        log: Callable[[str], None] | None,
    ):
        self.cfg, self.folder, self.record, self.log = cfg, folder, record, log or (lambda line: None)
        self.src = corpus(cfg)
        self.encoder = _encoder(cfg)  # a missing tokenizer fails here, before anything is read
        self.workers = _cores() if workers is None else workers
        self.name = prepared_dir(cfg).name
        self.identity = {
            "format_version": FORMAT_VERSION,
            "source": self.src.source,
            "files": self.src.fingerprint(),
            "data": {k: v for k, v in asdict(cfg).items() if k not in ("data_dir", "gpt2_ranks", "hub_dir")},
        }
        self.progress = progress
        self.pool: ProcessPoolExecutor | None = None
        self.chars = 0

    # -- state on disk

    def _resume_state(self) -> dict | None:
        try:
            rec = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return None
        if rec.get("identity") != json.loads(json.dumps(self.identity)):
            return None  # another corpus version, tokenizer or format: start over
        itemsize = self.encoder[2].itemsize
        for s in SPLITS:
            f = self.folder / f"{s}.bin"
            if not f.exists() or f.stat().st_size < rec["splits"][s]["tokens"] * itemsize:
                return None
        return rec

    def _commit(self) -> None:
        for w in self.writers.values():
            w.sync()  # the tokens before the record that names them
        while self.marks and self.marks[0]["docs"] <= self.docs:  # the newest stream position at or before it
            self.mark = self.marks.popleft()
        write_json(
            self.record,
            {
                "identity": self.identity,
                "docs": self.docs,
                "stopped": self.stopped,
                "mark": self.mark,
                "splits": {s: {"tokens": w.tokens, "docs": w.docs} for s, w in self.writers.items()},
            },
        )
        self.committed = time.monotonic()

    # -- the build

    def run(self) -> dict:
        rec = self._resume_state() if self.folder.is_dir() else None
        if rec is None:
            self.record.unlink(missing_ok=True)
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            rec = {"docs": 0, "stopped": False, "splits": {s: {"tokens": 0, "docs": 0} for s in SPLITS}}
        dtype = self.encoder[2]
        self.writers = {
            s: _TokenWriter(
                self.folder / f"{s}.bin", dtype, self.cfg.max_train_tokens if s == "train" else 0, **rec["splits"][s]
            )
            for s in SPLITS
        }
        self.docs, self.stopped, self.mark = rec["docs"], rec["stopped"], rec.get("mark")
        self.marks: collections.deque[dict] = collections.deque()
        self.resumed_at = self.docs
        if self.docs:
            at = f"; the stream starts at document {self.mark['docs']:,}" if self.mark else ""
            self.log(
                f"prepare {self.name}: resuming after {self.docs:,} documents "
                f"({self.writers['train'].tokens:,} train / {self.writers['val'].tokens:,} val tokens done{at})"
            )
        self.committed = time.monotonic()
        self.meter = _Progress(self.name, self.src.count, self.cfg.max_train_tokens, self.progress, self.log, self.docs)
        ok = False
        try:
            self._read_with_retries()
            self._commit()
            ok = True
        finally:
            if self.pool is not None:
                if not ok:  # a worker may be stuck (the chunk timeout): end them rather than wait on it
                    for proc in list((getattr(self.pool, "_processes", None) or {}).values()):
                        proc.kill()
                self.pool.shutdown(wait=True, cancel_futures=True)
            self.meter.close(ok)
            files = {f"{s}.bin": w.close() for s, w in self.writers.items()}
        for s, w in self.writers.items():
            if not w.tokens:
                raise DataError(f"{self.src.source} gave no {s} tokens: the corpus is empty or too small")
        meta = {
            "format_version": FORMAT_VERSION,
            "dataset": self.cfg.dataset,
            "source": self.src.source,
            "tokenizer": self.cfg.tokenizer,
            "vocab_size": VOCAB_SIZES[self.cfg.tokenizer],
            "dtype": dtype.name,
            "eot_token": self.encoder[0].eot_token,
            "train_tokens": self.writers["train"].tokens,
            "val_tokens": self.writers["val"].tokens,
            "train_docs": self.writers["train"].docs,
            "val_docs": self.writers["val"].docs,
            "max_train_tokens": self.cfg.max_train_tokens,
            "files": files,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "prepare_seconds": round(self.meter.elapsed(), 1),
            "resumed_at_docs": self.resumed_at,
        }
        write_json(self.folder / "meta.json", meta)
        fsync_dir(self.folder)
        return meta

    def _tokens(self) -> int:
        return sum(w.tokens for w in self.writers.values())

    def _read_with_retries(self) -> None:
        failures = 0
        while not self.stopped:
            before = self.docs
            try:
                self._read()
                return
            except _StreamFailed as failed:
                e = failed.__cause__
                if self.docs:
                    self._commit()
                failures = 1 if self.docs > before else failures + 1
                done = (
                    f"{self.docs:,} documents ({self.writers['train'].tokens:,} train / "
                    f"{self.writers['val'].tokens:,} val tokens) are done"
                )
                if not _retryable(e) or failures > len(RETRY_DELAYS):
                    if not self.docs and isinstance(e, DataError):
                        raise e from None  # bad input before anything was read: its own message says what to fix
                    tries = f" after {failures} tries" if _retryable(e) else ""
                    raise DataError(
                        f"reading corpus {self.cfg.dataset} ({self.src.source}) failed{tries}: {e}. {done} and kept in "
                        f"{self.folder}; run the same command again to continue from there"
                    ) from e
                delay = RETRY_DELAYS[failures - 1]
                self.log(
                    f"prepare {self.name}: reading failed ({one_line(e, typed=True)}); {done}; "
                    f"retry {failures}/{len(RETRY_DELAYS)} in {delay:g} s"
                )
                time.sleep(delay)

    def _read(self) -> None:
        """One pass over the stream from the recorded document on; a stream error ends it as _StreamFailed
        after every document read before it is written and recorded."""
        pending: collections.deque[tuple[_Chunk, Future]] = collections.deque()
        chunk, index, skip = _Chunk(([], [])), 0, self.docs
        self.marks.clear()
        if self.src.resume_docs is not None:  # start at the stream position recorded last, not at its start
            stream = self.src.resume_docs(self.mark, self.marks)
            index = self.mark["docs"] if self.mark else 0
        else:
            stream = self.src.docs()
        train = self.writers["train"]
        cut = False
        try:
            for split, text in _guarded(stream):
                index += 1
                if index <= skip:
                    continue  # done before: read past it without tokenizing
                if split == "train" and train.full:
                    if self.src.val_last:
                        continue  # keep reading: the val documents are still ahead
                    cut = True
                    break
                chunk.add(split, text)
                if chunk.chars >= BATCH_CHARS:
                    chunk.end = index
                    pending.append((chunk, self._submit(chunk)))
                    chunk = _Chunk(([], []))
                    self._drain(pending, 2 * max(1, self.workers))
                    if self.stopped:
                        return
        finally:
            if chunk.chars or chunk.texts[0] or chunk.texts[1]:
                chunk.end = index
                pending.append((chunk, self._submit(chunk)))
            self._drain(pending, 0)
        if cut:
            self.stopped = True  # recorded: a resumed build must not read on past this document

    def _submit(self, chunk: _Chunk) -> Future:
        self.chars += chunk.chars
        if self.pool is None and self.workers > 0 and self.chars > POOL_AFTER_CHARS:
            self.pool = ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.cfg, os.getpid()),
            )
        if self.pool is not None:
            return self.pool.submit(_encode_in_worker, chunk.texts)
        done: Future = Future()
        done.set_result(_encode_chunk(self.encoder, chunk.texts))
        return done

    def _drain(self, pending: collections.deque, keep: int) -> None:
        """Write finished chunks in stream order until at most `keep` are in flight."""
        while len(pending) > keep:
            chunk, fut = pending.popleft()
            try:
                result = fut.result(timeout=CHUNK_TIMEOUT_S)
            except FutureTimeout:
                raise DataError(
                    f"a tokenizer worker took over {CHUNK_TIMEOUT_S} s on one chunk of "
                    f"{chunk.chars:,} characters: is the machine overloaded?"
                ) from None
            if not self.stopped:
                self._write(chunk, result)
            if self.stopped:
                for _, f in pending:
                    f.cancel()
                pending.clear()
            if time.monotonic() - self.committed >= COMMIT_SECONDS:
                self._commit()

    def _write(self, chunk: _Chunk, result: list[tuple[np.ndarray, np.ndarray]]) -> None:
        (train_tok, _), (val_tok, val_ends) = result
        train, val = self.writers["train"], self.writers["val"]
        before = self._tokens()
        if train.full and not self.src.val_last:
            # train filled up in an earlier chunk: the val documents up to the next train document are
            # the last ones (the same documents a serial reader, stopping there, would have taken)
            if chunk.lead_val:
                val.write(val_tok[: val_ends[chunk.lead_val - 1]], chunk.lead_val)
            self.stopped = bool(chunk.texts[0])
        else:
            if chunk.texts[0] and not train.full:
                train.write(train_tok, len(chunk.texts[0]))
            if chunk.texts[1]:
                val.write(val_tok, len(chunk.texts[1]))
        self.meter.update(chunk.end - self.docs, self._tokens() - before, train.tokens)
        self.docs = chunk.end


class _Progress:
    """A tqdm bar (documents, with a total where the corpus's size is known) and a log line every
    LOG_SECONDS: documents, tokens (and the estimated total), rate and ETA."""

    def __init__(
        self,
        name: str,
        count: Callable[[], int | None],
        max_train: int,
        bar: bool,
        log: Callable[[str], None],
        start_docs: int,
    ):
        self.name, self.count, self.max_train, self.log = name, count, max_train, log
        self.total: int | None = None
        self.t0 = self.last_log = time.monotonic()
        self.docs = self.start_docs = start_docs
        self.tokens = self.new_tokens = self.train_tokens = 0
        self.bar = tqdm(
            desc=f"prepare {name}", unit="doc", unit_scale=True, initial=start_docs, disable=not bar, smoothing=0.05
        )

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def fraction(self) -> float | None:
        parts = []
        if self.total:
            parts.append(min(1.0, self.docs / self.total))
        if self.max_train:
            parts.append(min(1.0, self.train_tokens / self.max_train))
        return max(parts) if parts else None

    def update(self, docs: int, tokens: int, train_tokens: int) -> None:
        if self.count is not None:  # asked once the stream delivers: a hub corpus's info needs the hub
            try:
                self.total = self.count() or None
            except Exception:  # an estimate for the progress bar only
                self.total = None
            self.count = None
            self.bar.total = self.total
        self.docs += docs
        self.new_tokens += tokens
        self.train_tokens = train_tokens
        self.bar.update(docs)
        self.bar.set_postfix_str(f"{self.new_tokens / 1e6:,.1f}M tok", refresh=False)
        if time.monotonic() - self.last_log >= LOG_SECONDS:
            self.last_log = time.monotonic()
            self.log(self.line())

    def line(self, done: bool = False) -> str:
        dt = max(self.elapsed(), 1e-9)
        rate = self.new_tokens / dt
        frac = self.fraction()
        head = f"prepare {self.name}: {self.docs:,}" + (f"/{self.total:,}" if self.total else "") + " documents"
        tok = f"{self.new_tokens / 1e6:,.1f}M tokens" + (" this run" if self.start_docs else "")
        if frac and not done:
            new_frac = frac - (self.start_docs / self.total if self.total else 0)
            if new_frac > 0:
                est = self.new_tokens / new_frac
                tok += f" (~{est / 1e6:,.0f}M in all, estimated)"
                left = dt * (1 - frac) / new_frac
                return f"{head} ({100 * frac:.0f}%), {tok}, {rate / 1e6:.2f}M tokens/s, ETA {fmt_secs(left)}"
        return f"{head}, {tok}, {rate / 1e6:.2f}M tokens/s" + (f", done in {fmt_secs(dt)}" if done else "")

    def close(self, ok: bool) -> None:
        self.bar.close()
        if ok and self.elapsed() >= LOG_SECONDS:  # a quick build needs no summary line
            self.log(self.line(done=True))
