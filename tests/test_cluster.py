"""The cluster: the shipped cluster.yaml against Ray's own validation, the shared-storage check,
drivers joining a running Ray head (RAY_ADDRESS and `ray job submit`), and trials spread over a
simulated multi-node GPU cluster."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from oelm_ray.cluster import check_cluster, placeholders
from oelm_ray.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "cluster.yaml"


# ------------------------------------------------------------------------------------------------
# cluster.yaml


def _variant(tmp_path: Path, change) -> Path:
    raw = yaml.safe_load(SHIPPED.read_text())
    change(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_shipped_cluster_yaml_is_valid_with_its_placeholders_listed():
    out = check_cluster(SHIPPED)
    assert "valid for Ray 2.60.0" in out
    assert "HEAD_HOST_TODO" in out and "SSH_USER_TODO" in out and "WORKER_HOST_TODO" in out
    with pytest.raises(ConfigError, match="placeholders still to fill in: provider.head_ip=HEAD_HOST_TODO"):
        check_cluster(SHIPPED, allow_placeholders=False)


def test_shipped_cluster_yaml_keeps_the_dashboard_local_and_uses_token_auth():
    raw = yaml.safe_load(SHIPPED.read_text())
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert all("RAY_AUTH_MODE=token" in c for c in raw["worker_start_ray_commands"] if "ray start" in c)
    assert "~/.ray/auth_token" in raw["file_mounts"]
    assert any("ray[default]==2.60.0" in c for c in raw["setup_commands"])
    assert any("pip install -q -e ~/oelm-ray" in c for c in raw["setup_commands"])
    assert "ssh_private_key" in raw["auth"] and "BEGIN" not in SHIPPED.read_text()  # a path, never a key


def test_filled_in_cluster_yaml_passes_strict(tmp_path):
    def fill(d):
        d["provider"].update(head_ip="10.1.2.3", worker_ips=["10.1.2.4", "gpu45"])
        d["auth"]["ssh_user"] = "alice"
    out = check_cluster(_variant(tmp_path, fill), allow_placeholders=False)
    assert "head 10.1.2.3, 2 worker(s)" in out and "TODO" not in out


@pytest.mark.parametrize(
    "change, expect",
    [
        (lambda d: d.update(max_worker=2), r"unknown key\(s\) in \(top level\): 'max_worker' \(did you mean 'max_workers'\?\)"),
        (lambda d: d["provider"].update(worker_ip=["h"]), r"unknown key\(s\) in provider: 'worker_ip' \(did you mean 'worker_ips'\?\)"),
        (lambda d: d["auth"].update(ssh_usr="x"), r"unknown key\(s\) in auth: 'ssh_usr' \(did you mean 'ssh_user'\?\)"),
        (lambda d: d.update(max_workers="two"), r"max_workers must be an integer, got a string \"two\""),
        (lambda d: d.update(setup_commands="pip install x"), r"setup_commands must be an array, got a string"),
        (lambda d: d["head_start_ray_commands"].append({"ray start --resources": "{a: 1}"}),
         r"head_start_ray_commands\[2\] must be a string, got a mapping .*quote the whole command"),
        (lambda d: d["provider"].pop("head_ip"), r"provider.head_ip is missing: .*provider.head_ip"),
        (lambda d: d["provider"].pop("worker_ips"), r"provider.worker_ips is missing: .*\[\] for a one-server cluster"),
        (lambda d: d["provider"].update(worker_ips=["HEAD_HOST_TODO"]), r"twice \(or the head as a worker\)"),
        (lambda d: d.update(available_node_types={"gpu": {"node_config": {}, "resources": {}}}, head_node_type="gpu"),
         r"Ray rejects the config: The field available_node_types is not supported for on-premise clusters"),
        (lambda d: d["head_start_ray_commands"].__setitem__(1, "ray start --head --dashboard-host=0.0.0.0"),
         r"exposes the dashboard .* --dashboard-host=127.0.0.1"),
    ],
    ids=["typo-top", "typo-provider", "typo-auth", "wrong-type", "wrong-type-list", "unquoted-command",
         "no-head", "no-workers", "head-as-worker", "ray-rejects", "open-dashboard"],
)
def test_bad_cluster_yaml_fails_with_a_readable_message(tmp_path, change, expect):
    with pytest.raises(ConfigError, match=expect) as e:
        check_cluster(_variant(tmp_path, change))
    assert "\n" not in str(e.value) and "bad.yaml" in str(e.value)


def test_yaml_syntax_error_and_missing_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("cluster_name: x\nprovider: {type: local\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        check_cluster(bad)
    with pytest.raises(ConfigError, match="not found"):
        check_cluster(tmp_path / "nope.yaml")


def test_placeholders_are_found_anywhere():
    assert placeholders({"a": {"b": ["x", "HOST_TODO"]}, "c": "ray start --head --port=6379 --address=HEAD_HOST_TODO:6379"}) == [
        "a.b[1]=HOST_TODO", "c (HEAD_HOST_TODO)"]


def test_cli_check_cluster_exits_2_with_one_line(tmp_path):
    bad = _variant(tmp_path, lambda d: d["provider"].pop("head_ip"))
    r = subprocess.run([sys.executable, "-m", "oelm_ray", "check-cluster", str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("oelm-ray check-cluster: error:") and "provider.head_ip is missing" in r.stderr
    ok = subprocess.run([sys.executable, "-m", "oelm_ray", "check-cluster", str(SHIPPED)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "valid for Ray" in ok.stdout
