"""Reading W&B's `.wandb` files back (tests, debugging): the LevelDB-style log W&B writes.

Test-only: the library never reads these files (`wandb sync` uploads them).
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_records(path: str | os.PathLike) -> Iterator[Any]:
    """The protobuf `Record`s of a `.wandb` file (7-byte file header, 32 KiB blocks, chunked records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk  # full/first start a record, middle/last extend it
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def read_run(path: str | os.PathLike) -> dict:
    """id, group, job_type, tags, config, history ([{key: value, "_step": n}]), summary and exit_code of one `.wandb` file."""
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "exit_code": None}
    for rec in read_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out.update(
                id=r.run_id,
                project=r.project,
                group=r.run_group,
                job_type=r.job_type,
                name=r.display_name,
                tags=list(r.tags),
            )
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            row = {"/".join(i.nested_key) if i.nested_key else i.key: _item_value(i) for i in rec.history.item}
            row["_step"] = rec.history.step.num if rec.history.HasField("step") else row.get("_step")
            out["history"].append(row)
        elif kind == "summary":
            out["summary"].update(
                {
                    "/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json)
                    for i in rec.summary.update
                }
            )
        elif kind == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def read_finished(seg: Path, timeout: float = 20.0) -> dict:
    """One offline run folder read back, once W&B's service has written its exit record."""
    path = next(seg.glob("*.wandb"))
    deadline = time.monotonic() + timeout
    while not any(r.WhichOneof("record_type") == "exit" for r in read_records(path)) and time.monotonic() < deadline:
        time.sleep(0.2)  # finish() can return just before the service flushes the file
    return read_run(path)


def _item_value(item) -> Any:
    which = item.WhichOneof("value") if "value" in {o.name for o in item.DESCRIPTOR.oneofs} else None
    if which and which != "value_json":
        v = getattr(item, which)
        return None if which == "none" else (json.loads(v) if which == "json" else v)
    return json.loads(item.value_json) if item.value_json else None
