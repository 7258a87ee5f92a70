"""Data preparation throughput: `oelm_ray.core.data.prepare` against nanoGPT's openwebtext/prepare.py.

    python benchmarks/prepare_speed.py                  # 1 GB of text, GPT-2 tokens, N = the usable cores
    python benchmarks/prepare_speed.py --gb 2 --workers 2
    python benchmarks/prepare_speed.py --smoke          # ~20 MB (CI)

Generates a corpus of stories (`oelm_ray.core.stories`, no network) as local parquet shards laid out
like a hub repo (<work>/corpus/data/train-*.parquet), then prepares it twice, each in its own
process, on the same machine with the same N:

- ours: `prepare(dataset=openwebtext, hub_dir=<corpus>, tokenizer=gpt2, workers=N)`, i.e. datasets'
  streaming parquet reader, documents tokenized by N worker processes, train.bin / val.bin written;
- nanoGPT: `datasets.load_dataset("parquet", ..., num_proc=N)`, `train_test_split`, `.map(num_proc=N)`
  with `enc.encode_ordinary` + end-of-text, then the np.memmap uint16 write in 1024 shards (its
  data/openwebtext/prepare.py with the hub id replaced by the local files; a fresh datasets cache).

Prints each one's tokens, wall seconds, tokens/s and peak RSS (the sum over the process and its
children, polled every 50 ms, and the largest single process), and the ratio of tokens/s (goal:
>= 1.0). The generated corpus, both outputs and the datasets cache nanoGPT's way fills are deleted at the
end unless --keep (with --keep, a rerun reuses the corpus). Needs psutil (the test extras).
GPT-2's ranks come from --gpt2-ranks or OELM_GPT2_RANKS (a gpt2.tiktoken file; tiktoken's download otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

SHARD_BYTES = 64_000_000


def _write_shard(job: tuple[str, int, int]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from oelm_ray.core.stories import generate_stories

    path, nbytes, seed = job
    texts = list(generate_stories(nbytes, seed))
    tmp = path + ".tmp"
    pq.write_table(pa.table({"text": texts}), tmp, row_group_size=10_000)
    os.replace(tmp, path)
    return sum(len(t.encode()) for t in texts)


def generate(root: Path, total_bytes: int, procs: int) -> list[Path]:
    """Parquet shards of generated stories, about total_bytes of text; reused when already there."""
    n = max(2, -(-total_bytes // SHARD_BYTES))
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    paths = [data / f"train-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    jobs = [(str(p), total_bytes // n, 1000 + i) for i, p in enumerate(paths) if not p.exists()]
    if jobs:
        t0 = time.perf_counter()
        with Pool(procs) as pool:
            pool.map(_write_shard, jobs)
        print(
            f"generated {len(jobs)} shard(s) of {total_bytes // n / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    return paths


# ------------------------------------------------------------------------------------------------
# the two ways, each run in a child process (python prepare_speed.py --child ours|nanogpt ...)


def child_ours(corpus: Path, out: Path, workers: int, ranks: str) -> int:
    from oelm_ray.core.config import DataConfig
    from oelm_ray.core.data import prepare

    cfg = DataConfig(
        dataset="openwebtext",
        hub_dir=str(corpus),
        tokenizer="gpt2",
        gpt2_ranks=ranks,
        data_dir=str(out),
        val_fraction=0.0005,
    )
    meta = prepare(cfg, progress=False, workers=workers, log=lambda line: print(line, file=sys.stderr, flush=True))
    return meta["train_tokens"] + meta["val_tokens"]


def child_nanogpt(corpus: Path, out: Path, workers: int, ranks: str) -> int:
    # nanoGPT's data/openwebtext/prepare.py, reading the local parquet files instead of the hub id
    import numpy as np
    from datasets import load_dataset

    from oelm_ray.core.config import DataConfig
    from oelm_ray.core.prepared import get_tokenizer

    enc = get_tokenizer(DataConfig(tokenizer="gpt2", gpt2_ranks=ranks))  # = tiktoken.get_encoding("gpt2")
    files = sorted(str(p) for p in (corpus / "data").glob("train-*.parquet"))
    dataset = load_dataset("parquet", data_files={"train": files}, num_proc=workers)
    split_dataset = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split_dataset["val"] = split_dataset.pop("test")

    def process(example):
        ids = enc.encode_ordinary(example["text"])
        ids.append(enc.eot_token)
        return {"ids": ids, "len": len(ids)}

    tokenized = split_dataset.map(process, remove_columns=["text"], desc="tokenizing the splits", num_proc=workers)
    total = 0
    out.mkdir(parents=True, exist_ok=True)
    for split, dset in tokenized.items():
        arr_len = np.sum(dset["len"], dtype=np.uint64)
        arr = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="w+", shape=(arr_len,))
        total_batches = min(1024, len(dset))  # nanoGPT's 1024 (fewer on a tiny split, where it would fail)
        idx = 0
        for batch_idx in range(total_batches):
            batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
            arr_batch = np.concatenate(batch["ids"])
            arr[idx : idx + len(arr_batch)] = arr_batch
            idx += len(arr_batch)
        arr.flush()
        total += int(arr_len)
    return total


def measure(method: str, corpus: Path, out: Path, workers: int, ranks: str, cache: Path, timeout: float) -> dict:
    """Run one way in a child process; wall time and peak RSS (process tree, polled)."""
    env = {
        **os.environ,
        "HF_DATASETS_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--gpt2-ranks",
        ranks,
    ]
    # the child's output goes to files: a pipe nobody reads until the end fills up and stops it
    out.parent.mkdir(parents=True, exist_ok=True)
    out_log, err_log = out.parent / f"{method}.stdout", out.parent / f"{method}.stderr"
    t0 = time.perf_counter()
    with open(out_log, "w") as so, open(err_log, "w") as se:
        proc = subprocess.Popen(cmd, env=env, stdout=so, stderr=se, text=True, start_new_session=True)
    try:
        peak_sum, peak_one = _watch(proc, method, t0, timeout)
    finally:  # interrupted (Ctrl-C, SIGTERM, --timeout): the child and the workers it forked go too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            print(f"{method}: its process {proc.pid} did not end 30 s after SIGKILL", file=sys.stderr)
    seconds = time.perf_counter() - t0
    stdout, stderr = out_log.read_text(), err_log.read_text()
    out_log.unlink()
    err_log.unlink()
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    tokens = json.loads(stdout.strip().splitlines()[-1])["tokens"]
    return {
        "method": method,
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "peak_rss_mb": peak_sum / 1e6,
        "peak_rss_one_mb": peak_one / 1e6,
    }


def _watch(proc: subprocess.Popen, method: str, t0: float, timeout: float) -> tuple[int, int]:
    """Peak RSS of proc's tree (summed, and its largest process), polled until it ends."""
    import psutil

    root = psutil.Process(proc.pid)
    peak_sum = peak_one = 0
    while proc.poll() is None:
        if time.perf_counter() - t0 > timeout:
            raise SystemExit(f"{method} ran past --timeout {timeout:.0f} s")
        try:
            rss = []
            for p in [root, *root.children(recursive=True)]:
                try:
                    rss.append(p.memory_info().rss)
                except psutil.Error:
                    pass
            peak_sum, peak_one = max(peak_sum, sum(rss)), max(peak_one, max(rss, default=0))
        except psutil.Error:
            pass
        time.sleep(0.05)
    return peak_sum, peak_one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0, help="GB of text to generate (default 1)")
    ap.add_argument("--smoke", action="store_true", help="about 20 MB: checks that everything runs")
    ap.add_argument(
        "--workers", type=int, default=0, help="N: worker processes of each way (default: the usable cores)"
    )
    ap.add_argument(
        "--gpt2-ranks",
        default=os.environ.get("OELM_GPT2_RANKS", ""),
        help="local gpt2.tiktoken (default OELM_GPT2_RANKS; else tiktoken's download)",
    )
    ap.add_argument("--work", default="", help="folder for the corpus and outputs (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated corpus and the outputs")
    ap.add_argument("--repeats", type=int, default=1, help="run both ways this many times, alternating")
    ap.add_argument("--only", choices=("ours", "nanogpt"), default=None, help="run one way only")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one way may take")
    ap.add_argument("--child", choices=("ours", "nanogpt"), help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:  # keeps SIGTERM's default: the worker pools it forks are terminated with it
        fn = child_ours if args.child == "ours" else child_nanogpt
        print(json.dumps({"tokens": fn(Path(args.corpus), Path(args.out), args.workers, args.gpt2_ranks)}), flush=True)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated run still cleans up its child

    from oelm_ray.core.config import DataConfig
    from oelm_ray.core.data import _cores
    from oelm_ray.core.prepared import get_tokenizer

    get_tokenizer(DataConfig(tokenizer="gpt2", gpt2_ranks=args.gpt2_ranks))  # a missing ranks file fails here
    workers = args.workers or _cores()
    gb = 0.02 if args.smoke else args.gb
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="prepare-speed-"))
    corpus = work / "corpus"
    try:
        generate(corpus, int(gb * 1e9), workers)
        text = sum(p.stat().st_size for p in (corpus / "data").glob("*.parquet"))
        print(
            f"corpus: {gb:g} GB of text ({text / 1e6:.0f} MB of parquet) in {corpus}; N = {workers} workers; "
            f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        rows = []
        methods = [args.only] if args.only else ["ours", "nanogpt"]
        for r in range(args.repeats):
            for m in methods if r % 2 == 0 else methods[::-1]:
                out, cache = work / f"out-{m}", work / f"hf-cache-{m}"
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(cache, ignore_errors=True)
                row = measure(m, corpus, out, workers, args.gpt2_ranks, cache, args.timeout)
                rows.append(row)
                print(
                    f"{m:8s} {row['tokens']:>13,} tokens {row['seconds']:8.1f} s {row['tok_s'] / 1e6:7.2f} M tokens/s "
                    f"peak RSS {row['peak_rss_mb']:7.0f} MB (largest process {row['peak_rss_one_mb']:.0f} MB)",
                    flush=True,
                )
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
                    shutil.rmtree(cache, ignore_errors=True)
        if len({r["tokens"] for r in rows}) > 1:
            raise SystemExit(f"the ways disagree on the number of tokens: {sorted({r['tokens'] for r in rows})}")
        if len(methods) == 2:
            import statistics

            med = {m: statistics.median(r["tok_s"] for r in rows if r["method"] == m) for m in methods}
            rss = {m: max(r["peak_rss_mb"] for r in rows if r["method"] == m) for m in methods}
            print(
                f"ratio ours/nanogpt (median tokens/s): {med['ours'] / med['nanogpt']:.2f}   "
                f"peak RSS: ours {rss['ours']:.0f} MB, nanogpt {rss['nanogpt']:.0f} MB",
                flush=True,
            )
    finally:
        if not args.keep:  # what this run made (a given --work folder only if that leaves it empty)
            for part in ["corpus", *(f"{k}-{m}" for k in ("out", "hf-cache") for m in ("ours", "nanogpt"))]:
                shutil.rmtree(work / part, ignore_errors=True)
            for log in [*work.glob("*.stdout"), *work.glob("*.stderr")]:  # an interrupted child's output
                log.unlink()
            with contextlib.suppress(OSError):
                work.rmdir()


if __name__ == "__main__":
    main()
