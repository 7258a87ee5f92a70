"""Security: torch.load(weights_only=True) everywhere, no secrets in the repository, Ray on loopback only."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import ROOT


def _python_files() -> list[Path]:
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    untracked = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard", "*.py"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    return [ROOT / f for f in files + untracked if (ROOT / f).exists()]


def unsafe_torch_loads(source: str) -> list[int]:
    """Lines of torch.load(...) calls without a literal weights_only=True."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
        ):
            kw = {k.arg: k.value for k in node.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                bad.append(node.lineno)
    return bad


def test_every_torch_load_uses_weights_only():
    assert unsafe_torch_loads("import torch\ntorch.load(p)\ntorch.load(p, weights_only=False)\n") == [2, 3]
    files = _python_files()
    assert any(f.name == "checkpoint.py" for f in files)
    hits = {str(f.relative_to(ROOT)): lines for f in files if (lines := unsafe_torch_loads(f.read_text()))}
    assert not hits, f"torch.load without weights_only=True (unpickling can run code): {hits}"


SECRET_FILES = re.compile(r"(^|/)(\.netrc|\.env|auth_token|id_rsa|id_ed25519|credentials)$|\.(pem|key|p12)$")
SECRET_VALUES = [
    re.compile(r"(WANDB_API_KEY|api_key|token)\s*[=:]\s*[\"']?[0-9a-f]{32,}", re.I),  # W&B keys are 40 hex chars
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b(ghp|gho|hf)_[A-Za-z0-9]{20,}"),
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*[\"']?[A-Za-z0-9_\-]{16,}"),
    re.compile(r"\blocal-[0-9a-f]{40}\b"),  # a W&B local-server key
    re.compile(r"password\s*[=:]\s*[\"'][^\"'\s]{6,}[\"']", re.I),
]
_NOT_SOURCE = {".git", "__pycache__", ".pytest_cache", "runs", "data", "wandb"}


def project_files(root: Path) -> list[str]:
    """What the secret scan reads: in a git checkout, the tracked files and the untracked ones git does
    not ignore (about to be committed); elsewhere (an unpacked sdist, a copy) every file below root."""
    r = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if r.returncode == 0 and (root / ".git").exists():
        return sorted({f for f in r.stdout.split("\0") if f and (root / f).is_file()})
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not _NOT_SOURCE & set(p.relative_to(root).parts) and ".egg-info" not in str(p)
    )


def secret_hits(root: Path) -> list[str]:
    """Key files by name, and API keys, tokens, private keys and passwords in the files' text."""
    hits = []
    for f in project_files(root):
        if SECRET_FILES.search(f):
            hits.append(f"{f}: a secret file")
        p = root / f
        if p.stat().st_size < 2_000_000:
            text = p.read_text(errors="ignore")
            hits += [f"{f}: {pat.pattern}" for pat in SECRET_VALUES if pat.search(text)]
    return hits


def test_no_secrets_in_the_repository():
    files = project_files(ROOT)
    assert {"README.md", "oelm_ray/tune/sweep.py", "tests/test_security.py"} <= set(files), files[
        :20
    ]  # it reads the project
    hits = secret_hits(ROOT)
    assert not hits, hits


@pytest.mark.parametrize("git", [True, False], ids=["git-checkout", "plain-folder"])
def test_secret_scan_finds_planted_secrets(tmp_path, git):
    """The scan, file listing included, catches what it is for, in a git checkout and outside one."""
    hex40 = "0123456789abcdef" * 2 + "01234567"  # built at run time, so this file holds no key
    planted = {
        "wandb.cfg": "WANDB_API_KEY=" + hex40,
        "deploy/notes.md": "export RAY_AUTH_" + "TOKEN=" + "a1B2c3D4e5F6g7H8i9",
        "cluster/auth_token": "anything",
        "keys/head.pem": "-----BEGIN RSA PRIVATE" + " KEY-----\n",
        "wb.py": "key = 'local-" + hex40 + "'",
    }
    for name, text in {**planted, "clean.py": "token = os.environ['RAY_AUTH_TOKEN']\n"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    if git:
        subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
        subprocess.run(["git", "add", "wandb.cfg", "deploy", "cluster", "keys"], cwd=tmp_path, check=True)
        # wb.py stays untracked (about to be committed): the scan reads it too
    assert sorted({h.split(":")[0] for h in secret_hits(tmp_path)}) == sorted(planted)


_LISTEN_PROBE = """
import json, os, subprocess, sys
from oelm_ray.tune import resources
resources.connect(None)  # what `python sweeps/phase3.py` does on a laptop
import ray
ray.get(ray.remote(lambda: 1).remote())  # a worker up too
me = os.getpid()
kids = {}
for p in os.listdir("/proc"):
    if p.isdigit():
        try:
            kids.setdefault(int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1]), []).append(int(p))
        except OSError:
            pass
mine, todo = {me}, [me]
while todo:
    for c in kids.get(todo.pop(), []):
        if c not in mine:
            mine.add(c); todo.append(c)
import psutil
rows = []
for p in mine:
    try:
        conns = psutil.Process(p).net_connections(kind="inet")
    except psutil.Error:  # exited meanwhile
        continue
    rows += [f"{c.laddr.ip}:{c.laddr.port} pid={p}" for c in conns if c.status == psutil.CONN_LISTEN]
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "listening": rows}))
ray.shutdown()
"""


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only(tmp_path):
    """The local Ray that `resources.connect(None)` starts (no RAY_* settings in the environment, as for
    a user) has no listening socket beyond 127.0.0.1, and no dashboard."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    ray_tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")
    env["RAY_TMPDIR"] = ray_tmp
    try:
        r = subprocess.run([sys.executable, "-c", _LISTEN_PROBE], env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["gcs"].startswith("127.0.0.1:"), out
    assert out["listening"], "found none of Ray's sockets: the probe is broken"
    loopback = re.compile(r"^(127\.0\.0\.1|::ffff:127\.0\.0\.1|::1):\d+ ")
    exposed = [row for row in out["listening"] if not loopback.match(row)]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert not [row for row in out["listening"] if ":8265 " in row], "the dashboard is up"


def test_docs_document_token_auth_for_clusters():
    readme = (ROOT / "docs" / "cluster.md").read_text()
    assert re.search(r"^## Cluster", readme, re.M), "docs/cluster.md has no Cluster section"
    assert "RAY_AUTH" in readme, (
        "the Cluster section must say how token auth is set up (RAY_AUTH_MODE / RAY_AUTH_TOKEN)"
    )
