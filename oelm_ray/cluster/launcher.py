"""Offline check of a Ray cluster-launcher YAML (`oelm-ray check-cluster [cluster.yaml]`).

Runs Ray's own validation without touching any host: the raw file against Ray's bundled
`ray/autoscaler/ray-schema.json` first (a wrong type otherwise surfaces later as a TypeError deep in
Ray), then `prepare_config` and `validate_config` from `ray.autoscaler._private.util`, which is what
`ray up` does before it connects anywhere. On top, what the schema misses: typos inside `provider`
(the schema allows any key there), a local provider without `head_ip` / `worker_ips`, and the
`*_TODO` placeholders of the shipped cluster.yaml that still wait for real host names.

Every problem is one `ConfigError` line: which key, what is wrong, what to do.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from ..core.config import ConfigError

PLACEHOLDER = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)*_TODO\b")

# what Ray's local (on-prem) node provider and the updater read from `provider`
LOCAL_PROVIDER_KEYS = {
    "type",
    "head_ip",
    "worker_ips",
    "coordinator_address",
    "external_head_ip",
    "use_internal_ips",
    "use_external_head_ip",
}


def load(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML as a dict; a missing file or a YAML syntax error is a ConfigError."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"cluster config {p} not found: pass the path of your cluster.yaml (the repository ships one)"
        )
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(
            f"{p}: not valid YAML{where} ({problem}): fix the syntax (quote commands that contain ':' or '{{')"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{p}: the top level must be a mapping of keys (cluster_name, provider, ...), got {type(raw).__name__}"
        )
    return raw


def check_cluster(path: str | os.PathLike = "cluster.yaml", allow_placeholders: bool = True) -> str:
    """Validate a cluster config offline with Ray's own code plus our checks; return a short report.

    `*_TODO` placeholders and a missing `auth.ssh_private_key` file are notes in the report by default
    (the shipped file validates as it is); with `allow_placeholders=False` (`--strict`) they are errors,
    as they should be right before `ray up`.
    """
    p = Path(path)
    raw = load(p)
    _check_schema(raw, p)
    _check_provider(raw, p)
    _check_commands(raw, p)
    todo = placeholders(raw)
    if todo and not allow_placeholders:
        raise ConfigError(
            f"{p}: placeholders still to fill in: {', '.join(todo)}: replace them with your hosts and user"
        )
    key = (raw.get("auth") or {}).get("ssh_private_key")
    if not allow_placeholders and isinstance(key, str) and not Path(key).expanduser().is_file():
        raise ConfigError(
            f"{p}: auth.ssh_private_key {key} does not exist on this machine: point it at your private key "
            "(the one whose .pub is in the servers' ~/.ssh/authorized_keys), or make one with ssh-keygen"
        )
    prepared = _ray_validate(raw, p)

    prov = raw["provider"]
    lines = [f"{p}: valid for Ray {_ray_version()} (`ray up` would accept it)"]
    if prov.get("type") == "local" and "head_ip" in prov:
        workers = prov.get("worker_ips") or []
        lines.append(
            f"  head {prov['head_ip']}, {len(workers)} worker(s){': ' + ', '.join(map(str, workers)) if workers else ''}; "
            f"max_workers {prepared.get('max_workers')}"
        )
    if todo:
        lines.append(f"  TODO before `ray up`: fill in {', '.join(todo)}")
    lines += [f"  note: {n}" for n in _notes(raw, p)]
    return "\n".join(lines)


def placeholders(raw: Any, where: str = "") -> list[str]:
    """`key.path=VALUE` for every string that still holds a `*_TODO` placeholder."""
    out: list[str] = []
    if isinstance(raw, dict):
        for k, v in raw.items():
            out += placeholders(v, f"{where}.{k}" if where else str(k))
    elif isinstance(raw, list):
        for i, v in enumerate(raw):
            out += placeholders(v, f"{where}[{i}]")
    elif isinstance(raw, str) and PLACEHOLDER.search(raw):
        out.append(f"{where}={raw}" if len(raw) <= 40 else f"{where} ({', '.join(PLACEHOLDER.findall(raw))})")
    return out


# ------------------------------------------------------------------------------------------------
# the checks


def _schema() -> dict:
    import ray.autoscaler

    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as f:
        return json.load(f)


def _check_schema(raw: dict, p: Path) -> None:
    import jsonschema

    schema = _schema()
    err = jsonschema.exceptions.best_match(jsonschema.Draft7Validator(schema).iter_errors(raw))
    if err is None:
        return
    key = _keypath(err.absolute_path) or "(top level)"
    if err.validator == "additionalProperties":
        allowed = list(_subschema(schema, err.absolute_path).get("properties", {}))
        extra = re.findall(r"'([^']+)'", err.message.split(" were unexpected")[0].split(" was unexpected")[0])
        hints = [
            f"{x!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(x, allowed, 1)) else repr(x)
            for x in extra
        ]
        raise ConfigError(f"{p}: unknown key(s) in {key}: {', '.join(hints)}: Ray allows {', '.join(allowed)}")
    if err.validator == "type":
        want = err.validator_value if isinstance(err.validator_value, str) else " or ".join(err.validator_value)
        got = _yaml_type(err.instance)
        hint = " (quote the whole command in YAML)" if "commands" in key and isinstance(err.instance, dict) else ""
        raise ConfigError(f"{p}: {key} must be {_article(want)} {want}, got {got} {_short(err.instance)}{hint}")
    if err.validator == "required":
        raise ConfigError(f"{p}: {key}: {err.message}: add it (see the shipped cluster.yaml)")
    raise ConfigError(f"{p}: {key}: {err.message.splitlines()[0]}")


def _check_provider(raw: dict, p: Path) -> None:
    prov = raw["provider"]
    if prov.get("type") != "local":
        return  # a cloud provider: Ray's own checks below are all we add
    unknown = [k for k in prov if k not in LOCAL_PROVIDER_KEYS and not k.startswith("_")]
    if unknown:
        hints = [
            f"{k!r} (did you mean {m[0]!r}?)"
            if (m := difflib.get_close_matches(k, LOCAL_PROVIDER_KEYS, 1))
            else repr(k)
            for k in unknown
        ]
        raise ConfigError(
            f"{p}: unknown key(s) in provider: {', '.join(hints)}: an on-prem (local) provider takes "
            f"{', '.join(sorted(LOCAL_PROVIDER_KEYS))}"
        )
    if "coordinator_address" in prov:
        return
    missing = [k for k in ("head_ip", "worker_ips") if k not in prov]
    if missing:
        raise ConfigError(
            f"{p}: provider.{missing[0]} is missing: an on-prem cluster lists its head's address as "
            "provider.head_ip and the other servers as provider.worker_ips ([] for a one-server cluster)"
        )
    if not isinstance(prov["head_ip"], str) or not prov["head_ip"].strip():
        raise ConfigError(f"{p}: provider.head_ip must be the head server's hostname or IP, got {prov['head_ip']!r}")
    workers = prov["worker_ips"] or []
    bad = [w for w in workers if not isinstance(w, str) or not w.strip()]
    if bad:
        raise ConfigError(f"{p}: provider.worker_ips must be hostnames or IPs, got {bad[0]!r}")
    dup = sorted({w for w in workers if workers.count(w) > 1} | ({prov["head_ip"]} & set(workers)))
    if dup:
        raise ConfigError(
            f"{p}: provider.worker_ips lists {', '.join(dup)} twice (or the head as a worker): each server once"
        )


def _check_commands(raw: dict, p: Path) -> None:
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for i, cmd in enumerate(raw.get(key) or []):
            if re.search(r"--dashboard-host[= ]+0\.0\.0\.0", cmd):
                raise ConfigError(
                    f"{p}: {key}[{i}] exposes the dashboard (and job submission) to the network with "
                    "--dashboard-host=0.0.0.0: use --dashboard-host=127.0.0.1 and `ray dashboard cluster.yaml`"
                )


def _ray_validate(raw: dict, p: Path) -> dict:
    """Ray's own `prepare_config` + `validate_config`, with Ray's console output kept quiet."""
    import click
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            prepared = prepare_config(raw)
            validate_config(prepared)
    except jsonschema.ValidationError as e:
        raise ConfigError(
            f"{p}: Ray rejects the prepared config at {_keypath(e.absolute_path) or '(top level)'}: "
            f"{e.message.splitlines()[0]}"
        ) from None
    except (click.ClickException, ValueError, TypeError, KeyError, RuntimeError, AssertionError) as e:
        msg = e.format_message() if isinstance(e, click.ClickException) else f"{type(e).__name__}: {e}"
        raise ConfigError(f"{p}: Ray rejects the config: {' '.join(msg.split())}") from None
    return prepared


def _notes(raw: dict, p: Path) -> list[str]:
    """Things about this machine, not the file: `ray up` needs them but they are no config error."""
    notes = []
    key = (raw.get("auth") or {}).get("ssh_private_key")
    if key and not Path(key).expanduser().exists():
        notes.append(f"auth.ssh_private_key {key} does not exist on this machine")
    for remote, local in (raw.get("file_mounts") or {}).items():
        if isinstance(local, str) and not Path(local).expanduser().exists():
            hint = (
                " (run `ray get-auth-token --generate`)"
                if "auth_token" in local
                else " (run `ray up` from the repository root)"
            )
            notes.append(f"file_mounts source {local} (for {remote}) does not exist here{hint}")
    return notes


# ------------------------------------------------------------------------------------------------
# helpers


def _keypath(parts) -> str:
    out = ""
    for x in parts:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out


def _subschema(schema: dict, path) -> dict:
    node = schema
    for x in path:
        node = node.get("items", {}) if isinstance(x, int) else node.get("properties", {}).get(x, {})
    return node


def _yaml_type(v: Any) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "true/false",
        int: "a number",
        float: "a number",
        type(None): "nothing (null)",
    }.get(type(v), type(v).__name__)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


def _ray_version() -> str:
    import ray

    return ray.__version__
