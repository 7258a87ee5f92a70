"""What a finished trial leaves on storage, to tell whether a rerun touched it."""

from __future__ import annotations

import hashlib
from pathlib import Path


def state_files(run_dir: Path, names) -> dict[str, tuple[int, str]]:
    """(mtime_ns, sha256) of every file in the named trials' state folders (<run>/<trial>/state/:
    train.log, latest.pt, metrics.jsonl, ...): a trial that trains again, even to the same numbers,
    rewrites them."""
    out = {}
    for name in names:
        files = sorted(p for p in (run_dir / name / "state").rglob("*") if p.is_file())
        assert files, f"{name} has no state files: the fingerprint would be vacuous"
        out |= {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}
    return out
