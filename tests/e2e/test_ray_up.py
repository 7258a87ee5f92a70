"""The shipped cluster.yaml through Ray's own launcher over real ssh, as a new user would use it.

An sshd on 127.0.0.1 plays the server. Everything runs inside namespaces this test makes for itself:
its own network (a loopback of its own: port 22, Ray's 6379 and 8265 are free there, and nothing
outside can reach them), its own process table (the yaml's `ray stop` and `ray down` see only this
cluster's Ray, never another one on the machine) and a mount namespace for that /proc. Killing the
namespace's first process ends everything in it, whatever failed.

The only changes to cluster.yaml are the README's placeholders (head 127.0.0.1, no workers, this
account); the key and the token are made the README's way in a home folder of the test's own. The
server's environment sets OELM_VENV (cluster.yaml's documented switch) to this Python environment,
so setup installs nothing.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from oelm_ray.cluster.launcher import placeholders

from ray_jobs import until_job_agent

ROOT = Path(__file__).resolve().parents[2]
TOOLS = {
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "rsync": "rsync",
    "unshare": "util-linux",
    "nsenter": "util-linux",
    "ip": "iproute2",
}


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


# the namespace's init: it reaps every orphan (Ray's daemons end up its children), so a stopped Ray
# process is gone, not a zombie
REAPER = "import os, time\nwhile True:\n    try: os.wait()\n    except ChildProcessError: time.sleep(0.2)"


class Namespace:
    """A process that owns fresh net, pid and mount namespaces; `run` executes a command inside."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [
                "unshare",
                "--net",
                "--pid",
                "--fork",
                "--mount-proc",
                "--mount",
                "sh",
                "-c",
                f"ip link set lo up && exec {sys.executable} -c '{REAPER}'",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 30
        self.pid = None
        while time.time() < deadline and self.pid is None and self.proc.poll() is None:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.pid = int(children.read_text().split()[0])
            time.sleep(0.1)
        if not self.pid:
            self.proc.kill()
            raise AssertionError(f"unshare did not start (exit {self.proc.poll()}): the test needs root")
        time.sleep(0.5)  # `ip link set lo up` before anything connects

    def run(self, cmd: list[str] | str, env: dict, cwd: Path, timeout: float, **kw) -> subprocess.CompletedProcess:
        cmd = ["sh", "-c", cmd] if isinstance(cmd, str) else cmd
        kw.setdefault("capture_output", "stdout" not in kw)
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "--net", "--pid", "--mount", f"--wd={cwd}", "--", *cmd],
            env=env,
            text=True,
            timeout=timeout,
            **kw,
        )

    def close(self):
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.proc.kill()  # the pid namespace's init: the kernel ends every process in it
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)


def _fill_placeholders(text: str, user: str, key: Path) -> str:
    """What the README tells a user to do: the head's address, `worker_ips: []`, their account and
    the path of their key (ssh expands `~` with the account's passwd home, not $HOME: a full path)."""
    text = text.replace("head_ip: HEAD_HOST_TODO", "head_ip: 127.0.0.1")
    text = text.replace("worker_ips: [WORKER_HOST_TODO]", "worker_ips: []")
    text = text.replace("ssh_user: SSH_USER_TODO", f"ssh_user: {user}")
    text = text.replace("ssh_private_key: ~/.ssh/id_ed25519", f"ssh_private_key: {key}")
    assert not placeholders(yaml.safe_load(text))
    return text


@pytest.mark.slow
def test_ray_up_exec_job_submit_status_down_over_real_ssh():
    missing = [f"{t} ({pkg})" for t, pkg in TOOLS.items() if not _which(t)]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: `apt-get install openssh-server rsync iproute2` (.ci/run does)")
    if os.geteuid() != 0:
        pytest.fail("this test needs root (namespaces and an sshd of its own; CI runs as root)")
    user = getpass.getuser()
    base = Path(tempfile.mkdtemp(prefix="rup", dir="/tmp"))  # short: Ray's socket paths have a length limit
    ns = None
    try:
        client, server, d = base / "c", base / "s", base / "sshd"
        for p in (client / ".ssh", server, d, base / "ct", base / "st"):
            p.mkdir(parents=True)
        os.chmod(client / ".ssh", 0o700)
        # the client: the key and the token the README's way, in a home of the test's own
        env = {**os.environ, "HOME": str(client), "TMPDIR": str(base / "ct"), "RAY_USAGE_STATS_ENABLED": "0"}
        for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            env.pop(k, None)
        key = client / ".ssh" / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=60)
        r = subprocess.run(
            ["ray", "get-auth-token", "--generate"], env=env, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0 and (client / ".ray" / "auth_token").is_file(), r.stdout + r.stderr

        # the server: sshd on 127.0.0.1:22 of the namespace, its own host key, home and temp dir
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True, timeout=60
        )
        shutil.copy(f"{key}.pub", d / "authorized_keys")
        server_env = {"HOME": server, "TMPDIR": base / "st", "OELM_VENV": sys.prefix}
        if os.environ.get("PYTHONPATH"):  # a developer's checkout shadowing an installed copy
            server_env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        (d / "sshd_config").write_text(
            "ListenAddress 127.0.0.1\nPort 22\n"
            f"HostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "UsePAM no\nStrictModes no\nSubsystem sftp internal-sftp\n"
            f"SetEnv {' '.join(f'{k}={v}' for k, v in server_env.items())}\n"
        )
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation dir
        ns = Namespace()
        r = ns.run(
            [_which("sshd"), "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")], env=env, cwd=base, timeout=60
        )
        assert r.returncode == 0, r.stdout + r.stderr

        cfg = base / "cluster.yaml"
        cfg.write_text(_fill_placeholders((ROOT / "cluster.yaml").read_text(), user, key))
        ok = subprocess.run(
            [sys.executable, "-m", "oelm_ray", "check-cluster", "--strict", str(cfg)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ok.returncode == 0, ok.stderr

        def ray(*args, timeout=300, **kw):
            """`ray ARGS` on the client side; its output (also after a timeout) for the assertions."""
            log = base / "client.log"
            with open(log, "w") as f:
                try:
                    r = ns.run(
                        ["ray", *args], env={**env, **kw}, cwd=ROOT, timeout=timeout, stdout=f, stderr=subprocess.STDOUT
                    )
                    code = r.returncode
                except subprocess.TimeoutExpired:
                    code = f"timed out after {timeout} s"
            return code, f"$ ray {' '.join(args)} -> {code}\n" + log.read_text()

        t0 = time.time()
        code, out = ray("up", "-y", str(cfg))
        t_up = time.time() - t0
        assert code == 0, out[-4000:] + (d / "sshd.log").read_text()[-2000:]
        assert "OELM_VENV=" in out and "using that environment as it is" in out

        # the `ray` tool on the head runs in token mode
        code, out = ray("exec", str(cfg), "ray status")
        assert code == 0 and "AuthenticationError" not in out, out[-4000:]
        assert re.search(r"(Active|Idle):\s*\n\s*1 local\.cluster\.node", out) and re.search(r"/\d+\.0 CPU", out), out[
            -3000:
        ]

        # ... and that is what makes it work: without RAY_AUTH_MODE the same command is refused
        code, out = ray("exec", str(cfg), "env -u RAY_AUTH_MODE ray status")
        assert "AuthenticationError" in out, out[-3000:]

        # the README's job submission (over the dashboard on the head's loopback: the same loopback here)
        runs = server / "runs"
        t1 = time.time()
        code, out = until_job_agent(
            lambda: ray(
                "job",
                "submit",
                "--working-dir",
                ".",
                "--",
                "python",
                "sweeps/phase3.py",
                "--smoke-test",
                "--seeds",
                "0",
                "--storage",
                str(runs),
                "--no-wandb",
                RAY_ADDRESS="http://127.0.0.1:8265",
                RAY_AUTH_MODE="token",
            )
        )
        t_job = time.time() - t1
        assert code == 0 and re.search(r"Job 'raysubmit_\w+' succeeded", out), out[-4000:]

        code, out = ray("exec", str(cfg), f"oelm-ray status --storage {runs}")
        assert code == 0, out[-3000:]
        for trial in ("CPU-01-baseline-s0", "CPU-02-oelm_freeze-s0", "CPU-03-oelm_random-s0"):
            assert re.search(rf"{trial} .* completed ", out), out[-3000:]

        # the doctor on the head: joins the cluster in token mode, sees no GPU here, exits 2
        code, out = ray("exec", str(cfg), f"oelm-ray doctor --storage {runs}; echo doctor exit $?")
        assert "ok    Ray token mode: on" in out and re.search(r"Ray cluster: 1 node\(s\), \d+ CPUs, 0 GPUs", out), out[
            -3000:
        ]
        assert "GPUs torch sees: none" in out and "doctor exit 2" in out, out[-3000:]

        code, out = ray("down", "-y", str(cfg))
        assert code == 0, out[-3000:]
        deadline = time.time() + 60
        while True:  # `ray stop` gives Ray's processes a grace period
            left = [
                line.split()[1]
                for line in ns.run("ps -eo stat=,comm=", env=env, cwd=base, timeout=60).stdout.splitlines()
                if not line.startswith("Z")
            ]
            if not {"raylet", "gcs_server"} & set(left) or time.time() > deadline:
                break
            time.sleep(2)
        assert not {"raylet", "gcs_server"} & set(left), (left, out[-3000:])
        print(f"ray up {t_up:.0f} s, job {t_job:.0f} s, whole test {time.time() - t0:.0f} s")
    finally:
        if ns is not None:
            ns.close()
        shutil.rmtree(base, ignore_errors=True)
