"""`oelm-ray doctor`'s checks on faked facts, its exit code, and the torch-build table (torch_build.py)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from oelm_ray.cluster import doctor as D
from oelm_ray.cluster import torch_build as T

import ray_states

ROOT = Path(__file__).resolve().parents[2]


def test_torch_build_pick_follows_the_driver_table():
    assert T.pick(None) == "cpu"
    assert T.pick("535.104.05") == "cu121"
    assert T.pick("550.54.14") == "cu124" and T.pick("550.54.13") == "cu121"
    assert T.pick("570.86.15") == "cu128"
    assert T.pick("580.95.05") == "cu130"
    with pytest.raises(
        SystemExit, match=r"driver 470.82.01 is older than every PyTorch CUDA build \(cu118 needs >= 520"
    ):
        T.pick("470.82.01")
    assert (
        T.resolve("auto", "560.35.05") == "cu126"
        and T.resolve("CU118", "580.1") == "cu118"
        and T.resolve("cpu", None) == "cpu"
    )
    with pytest.raises(SystemExit, match="unknown torch build 'cu999'"):
        T.resolve("cu999", None)
    assert T.min_driver_for_cuda("12.6") == "560.28.03" and T.min_driver_for_cuda("10.2") is None


def test_docs_list_every_torch_build_with_its_driver():
    readme = (ROOT / "docs" / "cluster.md").read_text()
    for tag, (cuda, driver) in T.BUILDS.items():
        assert re.search(rf"\| `{tag}` \| {re.escape(cuda)} \| >= {re.escape(driver)} \|", readme), tag


def test_torch_build_script_runs_without_the_package_installed(tmp_path):
    # cluster.yaml runs it with the system python3 before anything is installed: stdlib only
    r = subprocess.run(
        [sys.executable, "-S", "-I", str(ROOT / "oelm_ray" / "cluster" / "torch_build.py"), "cu124"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert r.returncode == 0 and r.stdout.strip() == "cu124", r.stderr


def test_torch_and_driver_checks():
    assert D.check_torch(None, None)[0] is False
    assert D.check_torch("2.3.1", "12.1")[0] is False
    ok, line, fix = D.check_torch("2.13.0", None)
    assert ok is False and "CPU-only" in line and "TORCH=auto" in fix
    assert D.check_torch("2.13.0", "12.6") == (True, "torch 2.13.0, CUDA 12.6 build", "")

    ok, line, fix = D.check_driver(None, "12.6")
    assert ok is False and "none" in line
    ok, line, fix = D.check_driver("550.54.14", "12.8")  # a CUDA 12.8 torch on a 550 driver: no usable GPU
    assert ok is False and "older than 570.26" in line and "TORCH=cu124" in fix
    assert D.check_driver("570.86.15", "12.8")[0] is True
    assert D.check_driver("470.1", "13.0")[2].startswith("update the driver")


def test_gpu_bf16_ray_cluster_checks():
    assert D.check_gpus(False, [])[0] is False
    assert D.check_gpus(True, ["NVIDIA RTX A5000"] * 4) == (True, "GPUs torch sees: 4 (4 x NVIDIA RTX A5000)", "")
    assert D.check_bf16(False, False)[0] is None
    assert D.check_bf16(True, False)[0] is False and "fp16 with a gradient scaler" in D.check_bf16(True, False)[1]
    assert D.check_ray("2.60.0")[0] is True and D.check_ray("2.59.0")[0] is False and D.check_ray(None)[0] is False
    ok, line, fix = D.check_cluster(None, 0, "Connection refused")
    assert ok is False and "Connection refused" in line and "ray up cluster.yaml" in fix
    ok, line, fix = D.check_cluster({"CPU": 64.0, "GPU": 0.0}, 1, None)
    assert ok is False and "0 GPUs" in line and "--num-gpus" in fix
    assert D.check_cluster({"CPU": 64.0, "GPU": 4.0}, 1, None) == (True, "Ray cluster: 1 node(s), 64 CPUs, 4 GPUs", "")


def test_token_storage_gpt2_wandb_checks(tmp_path):
    token = tmp_path / "auth_token"
    assert D.check_token("token", token, False)[0] is False  # token mode without a token
    token.write_text("x" * 32)
    assert D.check_token("token", token, False)[0] is True and D.check_token("token", tmp_path / "no", True)[0] is True
    ok, line, fix = D.check_token(None, token, False)
    assert ok is False and "export RAY_AUTH_MODE=token" in fix
    assert D.check_token("disabled", token, False)[0] is True

    assert D.check_writable("storage", tmp_path / "a" / "b") == (True, f"storage {tmp_path / 'a' / 'b'}: writable", "")
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe is gone
    (tmp_path / "file").write_text("x")
    ok, line, fix = D.check_writable("storage", tmp_path / "file" / "sub")
    assert ok is False and "not writable" in line and "--storage" in fix

    assert D.check_shared("storage", tmp_path, None)[0] is None
    assert D.check_shared("storage", tmp_path, [("10.0.0.1", True)])[0] is None
    ok, line, fix = D.check_shared("storage", tmp_path, [("10.0.0.1", True), ("10.0.0.2", False)])
    assert ok is False and "not visible from 10.0.0.2" in line and "NFS" in fix
    assert D.check_shared("storage", tmp_path, [("10.0.0.1", True), ("10.0.0.2", True)])[0] is True

    assert D.check_gpt2(None)[0] is True
    ok, line, fix = D.check_gpt2("no network")
    assert ok is False and "OELM_GPT2_RANKS" in fix
    assert D.check_wandb(False, None)[0] is False and D.check_wandb(True, None)[0] is True
    assert D.check_wandb(False, "offline")[0] is True


def _ready_gpu_node(**kw) -> D.Facts:
    f = D.Facts(
        torch_version="2.13.0",
        torch_cuda="12.6",
        cuda_available=True,
        gpu_names=["NVIDIA RTX A5000"] * 4,
        bf16=True,
        driver="570.86.15",
        ray_version="2.60.0",
        resources={"CPU": 64.0, "GPU": 4.0},
        nodes=1,
    )
    for k, v in kw.items():
        setattr(f, k, v)
    return f


def test_exit_code_is_2_only_when_a_paper_sweep_needs_what_fails(tmp_path):
    token = tmp_path / "home" / ".ray" / "auth_token"
    token.parent.mkdir(parents=True)
    token.write_text("x" * 32)
    env = {"HOME": str(tmp_path / "home"), "RAY_AUTH_MODE": "token"}
    s, d = tmp_path / "runs", tmp_path / "runs" / "data"

    text, code = D.render(D.checks(_ready_gpu_node(), s, d, env))
    assert code == 0, text
    assert text.splitlines()[-1] == "ready for a --preset paper sweep"
    assert "warn  W&B: no API key" in text  # a sweep logs offline: a warning, not a failure
    assert "next: `oelm-ray selftest`" in text.splitlines()[-2]
    assert (
        len([x for x in text.splitlines() if not x.startswith(" ")]) == len(D.checks(_ready_gpu_node(), s, d, env)) + 2
    )

    for change, name in [
        (dict(torch_cuda=None), "torch"),
        (dict(cuda_available=False, gpu_names=[]), "gpus"),
        (dict(resources={"CPU": 64.0}), "cluster"),
        (dict(gpt2_error="offline"), "gpt2"),
        (dict(nodes=2, storage_seen=[("a", True), ("b", False)]), "storage_shared"),
    ]:
        text, code = D.render(D.checks(_ready_gpu_node(**change), s, d, env))
        assert code == 2 and f"not ready for a --preset paper sweep: {name} (exit 2)" in text, (change, text)
        assert "FAIL" in text and "fix:" in text


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_doctor_on_this_cpu_machine_says_no_gpu_and_exits_2(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "oelm_ray",
            "doctor",
            "--storage",
            str(tmp_path / "runs"),
            "--address",
            f"127.0.0.1:{_closed_port()}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "FAIL  GPUs torch sees: none" in r.stdout and "Ray cluster: cannot join" in r.stdout
    assert f"ok    storage {tmp_path / 'runs'}: writable" in r.stdout
    assert re.search(r"not ready for a --preset paper sweep: .*gpus.*cluster.* \(exit 2\)", r.stdout)


def test_doctor_finds_a_wandb_key_exactly_where_the_sweep_does(tmp_path):
    from oelm_ray.tune.wandb_key import has_key

    home = tmp_path / "home"
    home.mkdir()
    netrc = home / ".netrc"
    s, d = tmp_path / "runs", tmp_path / "runs" / "data"

    def agree(env) -> bool:
        ok = dict(D.checks(_ready_gpu_node(), s, d, env))["wandb"][0]
        assert ok is has_key(env), env
        return ok

    # "api.wandb.ai" in the file, but as part of another machine's name: the sweep has no key, so neither has doctor
    netrc.write_text("machine api.wandb.ai.mirror.example login user password " + "k" * 40 + "\n")
    assert agree({"HOME": str(home)}) is False
    # a self-hosted W&B (WANDB_BASE_URL): its key sits under its own host
    netrc.write_text("machine wandb.example.org login user password " + "k" * 40 + "\n")
    assert agree({"HOME": str(home), "WANDB_BASE_URL": "https://wandb.example.org"}) is True
    assert agree({"HOME": str(home)}) is False  # not a key for api.wandb.ai
    # a netrc that $NETRC points to, and an identity token file instead of a key
    netrc.rename(tmp_path / "elsewhere")
    assert (
        agree({"HOME": str(home), "NETRC": str(tmp_path / "elsewhere"), "WANDB_BASE_URL": "https://wandb.example.org"})
        is True
    )
    assert agree({"HOME": str(home), "WANDB_IDENTITY_TOKEN_FILE": str(tmp_path / "token")}) is True


@pytest.mark.timeout(120)
@pytest.mark.parametrize("found_cluster", list(ray_states.CLUSTER_STATES), indirect=True)
def test_doctor_answers_within_its_connect_timeout_whatever_state_the_cluster_is_in(found_cluster, tmp_path):
    c = found_cluster
    where = [] if c["address"] == "auto" else ["--address", c["address"]]  # none given: RAY_ADDRESS, else auto
    r, wall = ray_states.joining(
        "oelm_ray",
        "doctor",
        "--storage",
        str(tmp_path / "runs"),
        *where,
        "--connect-timeout",
        "20",
        env=c["env"],
        timeout=100,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    at = [i for i, line in enumerate(lines) if "Ray cluster" in line]
    assert len(at) == 1 and re.match("FAIL  Ray cluster: cannot join: " + c["what"], lines[at[0]]), r.stdout
    assert lines[at[0] + 1].startswith("        fix: ") and c["fix"] in lines[at[0] + 1], r.stdout
    assert re.search(r"not ready for a --preset paper sweep: .*cluster.* \(exit 2\)", lines[-1])
    assert wall < 20, f"{wall:.1f}s"  # the whole command, interpreter start and every other check included


@pytest.mark.timeout(120)
def test_doctor_joins_a_running_head_with_its_token(token_head, tmp_path):
    env = {**token_head["env"], "OELM_GPT2_RANKS": str(tmp_path / "no-gpt2")}
    r, wall = ray_states.joining(
        "oelm_ray",
        "doctor",
        "--storage",
        str(tmp_path / "runs"),
        "--address",
        token_head["address"],
        "--connect-timeout",
        "20",
        env=env,
        timeout=100,
    )
    assert "FAIL  Ray cluster: 1 node(s), 2 CPUs, 0 GPUs" in r.stdout, r.stdout + r.stderr[-2000:]
    assert r.returncode == 2 and wall < 20, f"{wall:.1f}s"  # no GPUs here: not ready, but it joined in time


def test_doctor_checks_the_wandb_key_without_importing_wandb_or_ray(tmp_path):
    # the doctor runs where W&B or Ray is missing (it reports that): its checks must not import them
    code = (
        "import sys; from pathlib import Path; from oelm_ray.cluster import doctor as D; "
        "f = D.Facts(ray_version='2.60.0', resources={'CPU': 2.0}, nodes=1); "
        f"D.checks(f, Path({str(tmp_path)!r}), Path({str(tmp_path / 'data')!r}), {{'HOME': {str(tmp_path)!r}}}); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'wandb'}))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
