"""Corpora as streams of (split, text) documents: the generated stories, the hub corpora, local files.

`corpus(cfg)` names a corpus and its documents; `iter_documents(cfg)` streams them, each tagged
"train" or "val" (the corpus's own validation split, or a deterministic held-out share of the
documents where it has none). A hub corpus fails fast, with what to do, when the hub is
unreachable. Tokenizing and the prepared files are `data.py`'s.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DataConfig
from .io import UserError, url_reachable
from .stories import generate_stories, split_seed


class DataError(UserError):
    """A missing, corrupt or mismatched data file; the message says what to fix."""


@dataclass(frozen=True)
class HubSpec:
    repo: str
    config: str | None
    text_field: str
    val_split: str | None  # the hub's validation split; None holds out val_fraction of train
    stream: bool  # stream from the hub instead of downloading into the datasets cache


# tinystories (2 GB) and wikitext103 (0.5 GB) download into the datasets cache, which makes a
# re-prepare cheap and lets HF_DATASETS_OFFLINE reuse a populated cache; the arrow files are
# memory-mapped, so iterating them never holds the corpus in memory. openwebtext (~40 GB of
# text) is streamed so it is never stored twice; with max_train_tokens only a prefix is fetched.
HUB = {
    "tinystories": HubSpec("roneneldan/TinyStories", None, "text", "validation", stream=False),
    "openwebtext": HubSpec("Skylion007/openwebtext", None, "text", None, stream=True),
    "wikitext103": HubSpec("Salesforce/wikitext", "wikitext-103-raw-v1", "text", "validation", stream=False),
}


@dataclass(frozen=True)
class Corpus:
    name: str  # folder-name part: what identifies the corpus's content
    source: str  # hub id or file path, for meta.json
    docs: Callable[[], Iterator[tuple[str, str]]]
    val_last: bool  # val documents come after all train documents (can't stop early on train)
    count: Callable[[], int | None] = lambda: None
    """About how many documents docs() yields, where that is cheap to know (progress and ETA); else None."""
    fingerprint: Callable[[], list] = lambda: []
    """What tells this corpus's content from an edited one (local files' sizes and times): a
    half-built copy is resumed only while it is unchanged."""
    resume_docs: Callable[[dict | None, list], Iterator[tuple[str, str]]] | None = None
    """Where the stream can start part-way: resume_docs(mark, marks) yields the documents after
    `mark` (None: from the first) and appends a mark {"docs": n, ...} to `marks` whenever the next
    document is the stream's n-th (documents counted from the stream's start)."""


def corpus(cfg: DataConfig) -> Corpus:
    """The corpus named by cfg.dataset."""
    if cfg.dataset == "stories":
        return Corpus(
            f"stories-{cfg.stories_mb:g}mb-s{cfg.stories_seed}",
            "oelm_ray.stories",
            lambda: _stories_docs(cfg),
            val_last=False,
        )
    if cfg.dataset in HUB:
        spec = HUB[cfg.dataset]
        name = cfg.dataset if spec.val_split else f"{cfg.dataset}-val{cfg.val_fraction:g}"
        source = cfg.hub_dir or spec.repo + (f"/{spec.config}" if spec.config else "")
        return Corpus(
            name,
            source,
            lambda: _hub_docs(cfg, spec),
            val_last=False,
            count=lambda: _hub_count(cfg, spec),
            resume_docs=None if cfg.dataset == "wikitext103" else lambda mark, marks: _hub_docs(cfg, spec, mark, marks),
            fingerprint=lambda: (
                _stats(f for fs in _hub_dir_files(cfg.hub_dir, spec).values() for f in fs) if cfg.hub_dir else []
            ),
        )
    path = Path(cfg.dataset).expanduser().resolve()
    # the path hash keeps two files called data.txt apart
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:8]
    return Corpus(
        f"{path.stem}-{digest}-val{cfg.val_fraction:g}",
        str(path),
        lambda: _local_docs(path, cfg.val_fraction),
        val_last=True,
        count=lambda: _local_count(path),
        fingerprint=lambda: _stats([path]),
    )


def _stats(paths: Iterable[str | Path]) -> list:
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:  # reading it says so
            continue
        out.append([str(p), st.st_size, st.st_mtime_ns])
    return out


def _parquet_rows(files: Iterable[str | Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _hub_count(cfg: DataConfig, spec: HubSpec) -> int | None:
    """Rows of the corpus's splits: from the parquet footers of a hub_dir, else the hub's dataset info."""
    if cfg.dataset == "wikitext103":
        return None  # rows are lines, not the articles they are joined into
    if cfg.hub_dir:
        return _parquet_rows(f for fs in _hub_dir_files(cfg.hub_dir, spec).values() for f in fs)
    import datasets  # called once documents arrived: the hub (or the cache) answers

    splits = datasets.load_dataset_builder(spec.repo, spec.config).info.splits or {}
    rows = [splits[s].num_examples for s in ("train", spec.val_split) if s and s in splits]
    return sum(rows) or None


def _local_count(path: Path) -> int | None:
    if path.suffix == ".parquet":
        return _parquet_rows([path])
    if path.suffix == ".jsonl":
        lines = 0
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                lines += block.count(b"\n")
        return lines
    return None


def iter_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    """Every (split, text) document of the corpus, split being "train" or "val"."""
    return corpus(cfg).docs()


def _stories_docs(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    train_bytes = int(cfg.stories_mb * 1_000_000)
    val_bytes = max(100_000, train_bytes // 20)
    # val first, so a max_train_tokens cut can stop generating as soon as train is full
    for split, n in (("val", val_bytes), ("train", train_bytes)):
        for text in generate_stories(n, split_seed(cfg.stories_seed, split)):
            yield split, text


def _is_heldout(i: int, fraction: float) -> bool:
    # a golden-ratio (Weyl) sequence: a fixed, evenly spread `fraction` of document indices
    return (i + 1) * 0.6180339887498949 % 1.0 < fraction


def _hub_docs(
    cfg: DataConfig, spec: HubSpec, mark: dict | None = None, marks: list | None = None
) -> Iterator[tuple[str, str]]:
    """The hub corpus's documents. With `marks`, a streamed split records its datasets state after
    each batch of rows, so that a resumed prepare starts there (`mark`) instead of re-reading (for
    a hub stream: re-downloading) everything before it; wikitext's articles span batches: no marks."""
    import datasets

    if cfg.hub_dir:
        # local parquet laid out like the hub repo; read in place (streaming), no cache copy
        kwargs: dict[str, Any] = {"path": "parquet", "data_files": _hub_dir_files(cfg.hub_dir, spec)}
        stream = True
    else:
        _check_hub_reachable(cfg)
        kwargs = {"path": spec.repo, "name": spec.config}
        stream = spec.stream
    try:
        ds = datasets.load_dataset(**kwargs, streaming=stream)
        splits = [("val", ds[spec.val_split]), ("train", ds["train"])] if spec.val_split else [("train", ds["train"])]
        i = n = mark["docs"] if mark else 0  # held-out counter; documents from the stream's start
        for k, (split, part) in enumerate(splits):
            if mark and k < mark["split"]:
                continue
            view = part.select_columns([spec.text_field])
            if mark and k == mark["split"]:
                view.load_state_dict(mark["state"])
            batches = view.iter(batch_size=1000)
            if marks is not None and hasattr(view, "state_dict"):
                batches = _marking(batches, spec.text_field, view, k, n, marks)
            lines = (text for batch in batches for text in batch[spec.text_field])
            texts = _wikitext_articles(lines) if cfg.dataset == "wikitext103" else lines
            for text in texts:
                if not text.strip():
                    continue
                if spec.val_split is None:
                    split = "val" if _is_heldout(i, cfg.val_fraction) else "train"
                    i += 1
                n += 1
                yield split, text
    except (ConnectionError, OSError, ValueError) as e:
        # chained, the error is retried when it is a network one; offline, retrying can't help
        cause = None if datasets.config.HF_HUB_OFFLINE and not cfg.hub_dir else e
        raise DataError(f"could not read {cfg.dataset} ({kwargs['path']}): {e}. {_hub_help(cfg)}") from cause


def _marking(batches: Iterator[dict], field: str, view: Any, k: int, n: int, marks: list) -> Iterator[dict]:
    # a batch's state is the position after it: the documents its non-empty rows become come first
    for batch in batches:
        n += sum(1 for t in batch[field] if t.strip())
        marks.append({"docs": n, "split": k, "state": view.state_dict()})
        yield batch


def _wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    # wikitext rows are single lines (a third of them empty); join them back into articles at
    # each top-level " = Title = " heading, so a document carries long-range context
    article: list[str] = []
    for line in lines:
        if line.startswith(" = ") and not line.startswith(" = = ") and article:
            yield "".join(article)
            article = []
        article.append(line)
    if article:
        yield "".join(article)


def _hub_dir_files(hub_dir: str, spec: HubSpec) -> dict[str, list[str]]:
    # accept <hub_dir>/[<config>/]**/<split>-*.parquet: the hub uses data/, plain_text/ or a
    # per-config folder depending on the repo
    root = Path(hub_dir).expanduser() / (spec.config or "")
    files = {}
    for split in ["train"] + ([spec.val_split] if spec.val_split else []):
        found = sorted(glob.glob(str(root / "**" / f"{split}-*.parquet"), recursive=True))
        if not found:
            raise DataError(
                f"no {split}-*.parquet files under {root}: hub_dir must hold the parquet files of "
                f"{spec.repo} laid out like the hub repo (e.g. {root}/data/{split}-00000-of-00001.parquet)"
            )
        files[split] = found
    return files


def _hub_help(cfg: DataConfig) -> str:
    return (
        f"To prepare {cfg.dataset} without network, download its parquet files on a machine with "
        f"network (repo {HUB[cfg.dataset].repo}) and pass --hub-dir, or set HF_DATASETS_OFFLINE=1 "
        "with a populated Hugging Face datasets cache"
    )


def _check_hub_reachable(cfg: DataConfig) -> None:
    """Fail fast when the hub can't be reached: datasets would otherwise retry for ~25 s."""
    import datasets

    # offline mode reads the cache and fails fast by itself; behind a proxy a direct probe proves
    # nothing, so let datasets try
    if datasets.config.HF_HUB_OFFLINE or any(
        os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    ):
        return
    if not _hub_reachable():
        raise DataError(f"the Hugging Face hub is unreachable (no network?). {_hub_help(cfg)}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    return url_reachable(constants.ENDPOINT, timeout)


def _local_docs(path: Path, val_fraction: float) -> Iterator[tuple[str, str]]:
    # two passes over the file: count the documents, then hold out the last val_fraction of them
    n = sum(1 for _ in _read_local(path))
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise DataError(f"{path} has {n} document(s); need at least 2 to hold out a validation split")
    for i, text in enumerate(_read_local(path)):
        yield ("val" if i >= n - n_val else "train"), text


def check_readable(cfg: DataConfig) -> None:
    """Raise DataError now, with what to fix, where reading cfg's corpus would fail at once: a missing local
    file, a hub_dir without the corpus's parquet files, an unreachable hub."""
    if cfg.is_local_file:
        _local_file(Path(cfg.dataset).expanduser().resolve())
    elif cfg.dataset in HUB and cfg.hub_dir:
        _hub_dir_files(cfg.hub_dir, HUB[cfg.dataset])
    elif cfg.dataset in HUB:
        _check_hub_reachable(cfg)


def _local_file(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist: fix the dataset path")


def _read_local(path: Path) -> Iterator[str]:
    """Documents of a local file: .txt paragraphs (blank-line separated), .jsonl or .parquet "text"."""
    _local_file(path)
    if path.suffix == ".txt":
        # one document per blank-line-separated block: a file of stories or articles splits
        # naturally, and a held-out tail of blocks is a fair validation set
        block: list[str] = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    block.append(line)
                elif block:
                    yield "".join(block).rstrip("\n")
                    block = []
        if block:
            yield "".join(block).rstrip("\n")
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f'{path}:{lineno}: expected a JSON object with a "text" field ({e})') from e
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise DataError(f'{path} has no "text" column (columns: {", ".join(pf.schema_arrow.names)})')
        for batch in pf.iter_batches(columns=["text"], batch_size=1000):
            yield from (t for t in batch.column(0).to_pylist() if t)
    else:
        raise DataError(f"dataset file {path} must end in .txt, .jsonl or .parquet")
