"""The cluster: the shipped cluster.yaml against Ray's own validation, the shared-storage check,
drivers joining a running Ray head (RAY_ADDRESS and `ray job submit`), and trials spread over a
simulated multi-node GPU cluster."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from oelm_ray.cluster.launcher import check_cluster, placeholders
from oelm_ray.core.config import ConfigError

import ray_states
from ray_jobs import until_job_agent

ROOT = Path(__file__).resolve().parents[2]
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
    assert any("-e ~/oelm-ray" in c and "download.pytorch.org/whl/$B" in c for c in raw["setup_commands"])
    assert "ssh_private_key" in raw["auth"] and "BEGIN" not in SHIPPED.read_text()  # a path, never a key
    # every shell on a node (ray exec, ray attach) runs the `ray` tool in token mode (issue 14)
    setup = "\n".join(raw["setup_commands"])
    assert "RAY_AUTH_MODE=token' > ~/.oelm-env" in setup and "echo 'source ~/.oelm-env' >> ~/.bashrc" in setup
    assert re.search(r"^TORCH=auto;", raw["setup_commands"][0])  # the one place that picks the torch build


def test_strict_check_refuses_a_missing_key_file(tmp_path):
    key = tmp_path / "id_test"

    def fill(d):
        d["provider"].update(head_ip="10.0.0.1", worker_ips=[])
        d["auth"].update(ssh_user="me", ssh_private_key=str(key))

    path = _variant(tmp_path, fill)
    assert "ssh_private_key" in check_cluster(path)  # a note without --strict
    with pytest.raises(ConfigError, match=r"auth.ssh_private_key .*id_test does not exist on this machine"):
        check_cluster(path, allow_placeholders=False)
    key.write_text("not really a key")
    assert "valid for Ray" in check_cluster(path, allow_placeholders=False)


def test_filled_in_cluster_yaml_passes_strict(tmp_path):
    def fill(d):
        d["provider"].update(head_ip="10.1.2.3", worker_ips=["10.1.2.4", "gpu45"])
        d["auth"].update(ssh_user="alice", ssh_private_key=str(key))

    key = tmp_path / "id_ed25519"
    key.write_text("a key")
    out = check_cluster(_variant(tmp_path, fill), allow_placeholders=False)
    assert "head 10.1.2.3, 2 worker(s)" in out and "TODO" not in out


@pytest.mark.parametrize(
    "change, expect",
    [
        (
            lambda d: d.update(max_worker=2),
            r"unknown key\(s\) in \(top level\): 'max_worker' \(did you mean 'max_workers'\?\)",
        ),
        (
            lambda d: d["provider"].update(worker_ip=["h"]),
            r"unknown key\(s\) in provider: 'worker_ip' \(did you mean 'worker_ips'\?\)",
        ),
        (lambda d: d["auth"].update(ssh_usr="x"), r"unknown key\(s\) in auth: 'ssh_usr' \(did you mean 'ssh_user'\?\)"),
        (lambda d: d.update(max_workers="two"), r"max_workers must be an integer, got a string \"two\""),
        (lambda d: d.update(setup_commands="pip install x"), r"setup_commands must be an array, got a string"),
        (
            lambda d: d["head_start_ray_commands"].append({"ray start --resources": "{a: 1}"}),
            r"head_start_ray_commands\[2\] must be a string, got a mapping .*quote the whole command",
        ),
        (lambda d: d["provider"].pop("head_ip"), r"provider.head_ip is missing: .*provider.head_ip"),
        (lambda d: d["provider"].pop("worker_ips"), r"provider.worker_ips is missing: .*\[\] for a one-server cluster"),
        (lambda d: d["provider"].update(worker_ips=["HEAD_HOST_TODO"]), r"twice \(or the head as a worker\)"),
        (
            lambda d: d.update(
                available_node_types={"gpu": {"node_config": {}, "resources": {}}}, head_node_type="gpu"
            ),
            r"Ray rejects the config: The field available_node_types is not supported for on-premise clusters",
        ),
        (
            lambda d: d["head_start_ray_commands"].__setitem__(1, "ray start --head --dashboard-host=0.0.0.0"),
            r"exposes the dashboard .* --dashboard-host=127.0.0.1",
        ),
    ],
    ids=[
        "typo-top",
        "typo-provider",
        "typo-auth",
        "wrong-type",
        "wrong-type-list",
        "unquoted-command",
        "no-head",
        "no-workers",
        "head-as-worker",
        "ray-rejects",
        "open-dashboard",
    ],
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
    assert placeholders(
        {"a": {"b": ["x", "HOST_TODO"]}, "c": "ray start --head --port=6379 --address=HEAD_HOST_TODO:6379"}
    ) == ["a.b[1]=HOST_TODO", "c (HEAD_HOST_TODO)"]


def test_cli_check_cluster_exits_2_with_one_line(tmp_path):
    bad = _variant(tmp_path, lambda d: d["provider"].pop("head_ip"))
    r = subprocess.run(
        [sys.executable, "-m", "oelm_ray", "check-cluster", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, r.stderr
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("oelm-ray check-cluster: error:") and "provider.head_ip is missing" in r.stderr
    ok = subprocess.run(
        [sys.executable, "-m", "oelm_ray", "check-cluster", str(SHIPPED)], capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0 and "valid for Ray" in ok.stdout


# ------------------------------------------------------------------------------------------------
# shared storage: a multi-node sweep refuses storage that some node cannot see


def test_storage_only_one_node_can_see_is_reported(tmp_path):
    from oelm_ray.tune.resources import check_shared_storage

    seen = []

    def probe(path):  # the head sees the token file, the second server has its own local disk
        seen.append(path)
        return [("10.0.0.1", Path(path).exists()), ("10.0.0.2", False)]

    with pytest.raises(ConfigError, match=r"storage .* is not visible from node\(s\) 10.0.0.2: .*NFS path.*s3://"):
        check_shared_storage(tmp_path, probe=probe)
    assert seen and not Path(seen[0]).exists()  # the token file is cleaned up
    check_shared_storage(tmp_path, probe=lambda p: [("10.0.0.1", True), ("10.0.0.2", Path(p).exists())])


# ------------------------------------------------------------------------------------------------
# a simulated multi-node GPU cluster (logical GPUs on CPU)


@pytest.mark.slow
def test_trials_spread_over_nodes_one_gpu_each(tmp_path, ray_local):
    import ray
    from ray import tune
    from ray.cluster_utils import Cluster

    from oelm_ray.core import experiments as E
    from oelm_ray.results import load_records
    from oelm_ray.tune import resources as R
    from oelm_ray.tune import sweep as S

    class Times(tune.Callback):
        def __init__(self):
            self.spans = {}

        def on_trial_start(self, iteration, trials, trial, **info):
            self.spans[str(trial)] = [time.time(), None]

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.spans[str(trial)][1] = time.time()

    ray.shutdown()  # a Cluster needs its own Ray
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2})
    cluster.add_node(num_cpus=2, num_gpus=2)
    cluster.wait_for_nodes()
    probed = []
    real_probe = R.probe_nodes
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        assert ray.cluster_resources()["GPU"] == 4
        R.probe_nodes = lambda p: probed.append(real_probe(p)) or probed[-1]  # the real probe, on both nodes
        times = Times()
        sw = S.Sweep(
            name="multi",
            experiments=list(E.EMBEDDED.values()),
            seeds=[0, 1],
            storage=str(tmp_path / "runs"),
            # logical GPUs: a trial would take the GPU Ray assigns it as cuda; train on CPU on purpose
            common={**E.SMOKE, "data_dir": str(tmp_path / "data"), "device": "cpu"},
            cpus_per_trial=1,
            callbacks=[times],
        )
        run_dir = S.run(sw, report=False)
    finally:
        R.probe_nodes = real_probe
        ray.shutdown()
        cluster.shutdown()
    assert len(probed[0]) == 2 and all(ok for _, ok in probed[0])  # both nodes saw the storage (one disk here)
    recs = load_records(run_dir)
    assert len(recs) == 8 and all(r["status"] == "completed" for r in recs), [r["status"] for r in recs]
    slot = {}
    for r in recs:
        places = {(h["node_id"], h["gpu"]) for h in r["history"]}
        assert len(places) == 1 and r["gpu"] in ("0", "1"), places  # one GPU id, for the trial's whole life
        slot[r["name"]] = places.pop()
    assert len({node for node, _ in slot.values()}) == 2  # trials ran on both nodes
    spans = times.spans
    events = sorted([(a, 1) for a, b in spans.values()] + [(b, -1) for a, b in spans.values()])
    running = peak = 0
    for _, d in events:
        running += d
        peak = max(peak, running)
    assert 1 < peak <= 4  # concurrent, never more trials than GPUs
    names = list(spans)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            (a0, a1), (b0, b1) = spans[a], spans[b]
            if a0 < b1 and b0 < a1:  # ran at the same time: never on the same GPU of the same node
                assert slot[a] != slot[b], (a, b, slot[a])


# ------------------------------------------------------------------------------------------------
# drivers joining a Ray head: RAY_ADDRESS, `ray job submit`; every state a found cluster can be in


def _phase3(*args, env, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "sweeps" / "phase3.py"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_driver_joins_a_running_head_by_ray_address_and_by_job_submit(tmp_path, token_head):
    env = {**token_head["env"], "RAY_ADDRESS": token_head["address"]}
    r = _phase3("--smoke-test", "--seeds", "0", "--storage", str(tmp_path / "a"), "--no-wandb", env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    run = tmp_path / "a" / "phase3-smoke"
    assert (run / "summary.md").exists()
    statuses = [json.loads(p.read_text())["status"] for p in (run / "trials").glob("*.json")]
    from oelm_ray.core.experiments import EMBEDDED

    assert statuses == ["completed"] * len(EMBEDDED), statuses

    # `ray job submit --no-wait`: the entrypoint runs on the head, the driver inherits its address
    job_env = {**token_head["env"], "RAY_ADDRESS": token_head["dashboard"]}
    entry = (
        f"{sys.executable} {ROOT / 'sweeps' / 'phase3.py'} --smoke-test --seeds 0 --experiments CPU-02 "
        f"--storage {tmp_path / 'b'} --no-wandb"
    )
    sub = until_job_agent(
        lambda: subprocess.run(
            ["ray", "job", "submit", "--no-wait", "--", *entry.split()],
            env=job_env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
    )
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = re.search(r"raysubmit_\w+", sub.stdout + sub.stderr).group(0)
    deadline, status = time.time() + 600, ""
    while time.time() < deadline:
        st = subprocess.run(["ray", "job", "status", job_id], env=job_env, capture_output=True, text=True, timeout=120)
        status = st.stdout + st.stderr
        if re.search(r"succeeded|failed|stopped", status, re.I):
            break
        time.sleep(3)
    logs = subprocess.run(
        ["ray", "job", "logs", job_id], env=job_env, capture_output=True, text=True, timeout=120
    ).stdout
    assert re.search(r"succeeded", status, re.I), status + logs[-3000:]
    rec = json.loads((tmp_path / "b" / "phase3-smoke" / "trials" / "CPU-02-oelm_freeze-s0.json").read_text())
    assert rec["status"] == "completed" and (tmp_path / "b" / "phase3-smoke" / "summary.md").exists()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("found_cluster", list(ray_states.CLUSTER_STATES), indirect=True)
def test_sweep_joining_a_cluster_answers_within_its_connect_timeout_whatever_state_it_is_in(found_cluster, tmp_path):
    c = found_cluster
    r, wall = ray_states.joining(
        str(ROOT / "sweeps" / "phase3.py"),
        "--smoke-test",
        "--storage",
        str(tmp_path / "runs"),
        "--no-wandb",
        "--address",
        c["address"],
        "--connect-timeout",
        "20",
        env=c["env"],
        timeout=100,
    )
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert re.match("phase3: error: " + c["what"], r.stderr) and c["fix"] in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert wall < 20, f"{wall:.1f}s"  # the whole command, interpreter start and trial validation included
    assert not (tmp_path / "runs" / "phase3-smoke").exists()  # nothing written before Ray answered


def test_join_gives_up_on_a_ray_init_that_blocks_past_the_timeout(monkeypatch):
    # a cluster that passes every cheap check and then hangs in ray.init: the deadline still answers
    import threading

    import ray

    from oelm_ray.tune import resources as R

    release = threading.Event()
    monkeypatch.setattr(R, "tcp_error", lambda *a, **k: None)
    monkeypatch.setattr(R, "_ask_gcs", lambda *a: None)
    monkeypatch.setattr(ray, "init", lambda **kw: release.wait(60))
    t0 = time.monotonic()
    try:
        with pytest.raises(
            R.ClusterUnreachable,
            match=r"^joining the Ray cluster at 127\.0\.0\.1:\d+ did not finish "
            r"within 2s: .*--connect-timeout",
        ):
            R.join(f"127.0.0.1:{ray_states.free_port()}", timeout=2)
        assert time.monotonic() - t0 < 4
    finally:
        release.set()
    for bad in (0, -1, float("nan")):
        for connect, address in ((R.join, "127.0.0.1:1"), (R.connect, None)):
            with pytest.raises(ConfigError, match="--connect-timeout .* must be a number of seconds > 0"):
                connect(address, timeout=bad)


def test_a_node_that_does_not_answer_the_storage_probe_is_one_line(ray_local, tmp_path, monkeypatch):
    from oelm_ray.core.config import ConfigError
    from oelm_ray.tune import resources as R

    monkeypatch.setattr(R, "PROBE_TIMEOUT_S", 1e-6)  # no task answers that fast
    with pytest.raises(ConfigError, match=r"1 node\(s\) were asked whether they see .* not all answered within 1e-06s"):
        R.probe_nodes(str(tmp_path / "x"))
