"""Shared test setup: one local Ray for the whole run, on loopback, with nothing phoning home."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

# set before Ray or W&B are imported anywhere in the test process (and inherited by Ray workers)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The small stories corpus (0.2 MB, bytes) the trainer tests train their tiny models on, prepared once."""
    from oelm_ray.core.config import make_config
    from oelm_ray.core.data import prepare

    d = tmp_path_factory.mktemp("data")
    prepare(make_config("cpu", stories_mb=0.2, data_dir=str(d)).data, progress=False)
    return str(d)


@pytest.fixture
def ray_local():
    """A local 2-CPU Ray on 127.0.0.1, started once and shared; tests that need another cluster
    shut it down themselves, and the next test using this fixture starts it again."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
        )
    yield ray


GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_CACHE = Path(os.environ.get("OELM_TEST_CACHE", Path.home() / ".cache" / "oelm-ray"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_gpt2_ranks(cache: Path = GPT2_CACHE) -> Path:
    """GPT-2's ranks file (gpt2.tiktoken), from the openai-whisper sdist on the package index.

    pip downloads the sdist into `cache` once (under a file lock: several test runs may share the
    cache), `whisper/assets/gpt2.tiktoken` is extracted and its sha256 checked. Any failure (no
    network, no such file, a wrong hash) raises with what to do: a failed test, never a skip.
    """
    from filelock import FileLock

    target = cache / "gpt2.tiktoken"
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / "gpt2.tiktoken.lock")):
        if target.exists() and _sha256(target) == GPT2_RANKS_SHA256:
            return target
        with tempfile.TemporaryDirectory(dir=cache, prefix=".whisper-") as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary=:all:",
                "-d",
                tmp,
                "openai-whisper",
            ]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            sdists = sorted(Path(tmp).glob("openai*whisper*.tar.gz"))
            if r.returncode != 0 or not sdists:
                raise RuntimeError(
                    f"could not download the openai-whisper sdist for gpt2.tiktoken ({' '.join(cmd)} -> exit "
                    f"{r.returncode}): {r.stderr.strip()[-800:]}\nThe GPT-2 tests need PyPI once; or set "
                    "OELM_GPT2_RANKS to a local gpt2.tiktoken"
                )
            with tarfile.open(sdists[0]) as tf:
                member = next((m for m in tf.getmembers() if m.name.endswith("/whisper/assets/gpt2.tiktoken")), None)
                if member is None:
                    raise RuntimeError(f"{sdists[0].name} holds no whisper/assets/gpt2.tiktoken")
                part = Path(tmp) / "gpt2.tiktoken"
                part.write_bytes(tf.extractfile(member).read())
            if (got := _sha256(part)) != GPT2_RANKS_SHA256:
                raise RuntimeError(
                    f"gpt2.tiktoken from {sdists[0].name} has sha256 {got}, expected {GPT2_RANKS_SHA256}"
                )
            os.replace(part, target)  # atomic: a reader sees the whole file or none
    return target


@pytest.fixture(scope="session")
def gpt2_ranks() -> Path:
    """Path of a verified gpt2.tiktoken: OELM_GPT2_RANKS if set, else fetched into ~/.cache/oelm-ray.

    Also exported as OELM_GPT2_RANKS, for code that reads the tokenizer from the environment.
    """
    given = os.environ.get("OELM_GPT2_RANKS")
    if given:
        path = Path(given)
        assert path.is_file() and _sha256(path) == GPT2_RANKS_SHA256, (
            f"OELM_GPT2_RANKS={given} is not GPT-2's gpt2.tiktoken (missing or wrong sha256): unset it to fetch one"
        )
        return path
    path = fetch_gpt2_ranks()
    os.environ["OELM_GPT2_RANKS"] = str(path)
    return path


def pytest_sessionfinish(session, exitstatus):
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass


@pytest.fixture
def no_key(monkeypatch, tmp_path):
    """No WANDB_* settings, HOME without a netrc, and any attempt to reach the network fails the test."""
    for var in (
        "WANDB_MODE",
        "WANDB_API_KEY",
        "WANDB_DISABLED",
        "WANDB_BASE_URL",
        "WANDB_IDENTITY_TOKEN_FILE",
        "NETRC",
    ):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))

    def no_network(*a, **k):
        raise AssertionError(f"W&B mode check touched the network: {a}")

    from oelm_ray.tune import wandb_logger

    monkeypatch.setattr(wandb_logger, "url_reachable", no_network)
    return home


# ------------------------------------------------------------------------------------------------
# the Ray cluster a driver (`oelm-ray doctor`, a sweep) can find: every state it must answer within its timeout
# (ray_states.CLUSTER_STATES)


@pytest.fixture(scope="session")
def dead_head():
    """A token-auth Ray head on 127.0.0.1, SIGKILLed: its address file names a GCS that is gone."""
    import ray_states

    with ray_states.head(kill=True) as h:
        yield h


@pytest.fixture(scope="session")
def token_head():
    """A running token-auth Ray head on 127.0.0.1 (its own token), shared by the tests that are refused by it."""
    import ray_states

    with ray_states.head() as h:
        yield h


@pytest.fixture
def found_cluster(request, tmp_path):
    """(address, environment, expected what regex, expected fix fragment) for the state named by the param."""
    import ray_states

    state = request.param
    env = ray_states.env(RAY_TMPDIR=str(tmp_path / "raytmp"), OELM_GPT2_RANKS=str(tmp_path / "no-gpt2"))
    (tmp_path / "raytmp").mkdir()
    what, fix = ray_states.CLUSTER_STATES[state]
    with contextlib.ExitStack() as stack:
        if state == "none":
            address = "auto"
        elif state == "dead-address-file":
            address, env["RAY_TMPDIR"] = "auto", str(request.getfixturevalue("dead_head")["tmpdir"])
        elif state == "dead-ray-address":
            address = request.getfixturevalue("dead_head")["address"]
        elif state == "unreachable-free-port":
            address = f"127.0.0.1:{ray_states.free_port()}"
        elif state == "unreachable-no-route":
            address = stack.enter_context(ray_states.connect_times_out())
        elif state == "refusing-the-token":
            head = request.getfixturevalue("token_head")
            wrong = tmp_path / "wrong_token"
            wrong.write_text("0" * 32)
            address, env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN_PATH"] = head["address"], "token", str(wrong)
        else:
            address = stack.enter_context(ray_states.silent_server())
        yield {"address": address, "env": env, "what": what, "fix": fix}
