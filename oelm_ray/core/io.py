"""The small I/O helpers everything shares: the user-error base class, an error as one line, atomic
writes, a run's metrics file, a TCP probe, a call with a deadline. No torch: the Ray side and the
reports read metrics files without it.

One of each, so that a fix (fsync the directory, keep the old file on a full disk) lands everywhere.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class UserError(Exception):
    """Bad input, missing data, a run in the way: the CLI and the recipes print the message as one
    line and exit 2 (a traceback means a bug). ConfigError, DataError, CheckpointError and
    RunExistsError derive from it."""


def one_line(e: BaseException, limit: int | None = 200, typed: bool = False) -> str:
    """An exception's message as one line: whitespace and newlines collapsed to single spaces, cut after
    `limit` characters (None: whole); `typed` puts its type's name first ("OSError: ..."). An empty
    message is the type's name alone."""
    text = " ".join(str(e).split())[:limit]
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text}" if typed else text


class DiskFullError(UserError, OSError):
    """A write ran out of space (ENOSPC, EDQUOT); the file it was to replace is still whole."""


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[Any], None],
    mode: str = "wb",
    before_replace: Callable[[], None] | None = None,
) -> None:
    """Write through `write(fileobj)` into a temp file beside `path`, fsync, then rename over it.

    A crash at any point leaves either the old file or the new one, never a torn one. `before_replace`
    runs once the temp file is on disk, just before the rename: raising there keeps the old file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        full = _disk_full(e)
        if full is not None:
            raise DiskFullError(
                f"no space left on the device while writing {path} ({full.strerror}); the previous "
                f"{path.name} is untouched: free space, then run the same command again"
            ) from None
        raise
    fsync_dir(path.parent)  # make the rename itself durable


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames in `path` durable; a filesystem that refuses to open a directory is harmless."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_full(e: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT error in e's chain (writers such as torch.save may wrap it), else None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__
    return None


# ------------------------------------------------------------------------------------------------
# a run's metrics file (metrics.jsonl): one JSON line per evaluation


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics file, oldest first; [] if there is none."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line after a crash: drop it
            break
    return rows


def append_metrics(path: str | os.PathLike, row: dict) -> None:
    """Append one row and fsync: a row on disk survives a crash right after."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Keep only the rows up to `step` (a resumed run's checkpoint): the later ones will be redone."""
    path = Path(path)
    rows = read_metrics(path)
    keep = [r for r in rows if r["step"] <= step]
    if len(keep) != len(rows) or (path.exists() and not rows and path.stat().st_size):
        atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in keep)), mode="w")


# ------------------------------------------------------------------------------------------------
# reachability


def tcp_error(host: str, port: int, timeout: float = 3.0, hello: bytes | None = None) -> str | None:
    """Why nothing answers a TCP connect to host:port within `timeout`, or None when something does.

    With `hello`, the probe also sends those bytes and waits `timeout` for the first byte back (or the
    server closing the connection): a server that accepts and then stays silent is an error too.
    """
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except TimeoutError:
        return f"no answer to a TCP connect within {timeout:g}s"
    except (OSError, ValueError) as e:
        return _reason(e)
    with sock:
        if hello is None:
            return None
        try:
            sock.sendall(hello)
        except OSError as e:
            return _reason(e)
        try:
            sock.recv(1)
        except TimeoutError:
            return f"it accepts connections but sends nothing back within {timeout:g}s"
        except OSError:
            pass  # a reset is an answer too: something there read the bytes
    return None


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


class DeadlineExceeded(TimeoutError):
    """`call_within`'s function did not return in time."""


def call_within(fn: Callable[[], Any], timeout: float) -> Any:
    """fn()'s result, or the exception it raised, from a daemon thread; DeadlineExceeded after `timeout`
    seconds (the thread is left to finish, or to end with the process)."""
    out: dict[str, Any] = {}

    def go():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the caller
            out["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise DeadlineExceeded(f"timed out after {timeout:g}s")
    if "error" in out:
        raise out["error"]
    return out.get("value")


def url_reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connect to the URL's host and port (default 443 / 80 by scheme) succeeds."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    return bool(parts.hostname) and tcp_error(parts.hostname, port, timeout) is None
