"""The README and docs/ stay true: every command they show parses with today's flags, the tables they
carry are generated from the code, and the README stays short."""

import argparse
import contextlib
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_OURS = {"pip", "apt-get", "ray", "ruff", "git", "export", "cd", "ssh", "source", "sudo", "cat", "ls", "wandb"}


def _fenced(text: str) -> list[str]:
    """Shell lines of the ```bash blocks, continuation lines joined."""
    out = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)\n```", text, re.S):
        out += block.replace("\\\n", " ").splitlines()
    return out


def _inline(text: str) -> list[str]:
    """Inline `...` spans that are whole commands of ours (no `...` or `a / b` shorthand in them),
    outside the bad-input table, whose examples are wrong on purpose (tests/test_bad_input.py
    checks each fails)."""
    kept, header = [], ""
    for line in text.splitlines():
        header = (header or line) if line.startswith("|") else ""
        if not header.startswith("| bad input |"):
            kept.append(line)
    spans = re.findall(r"`([^`\n]+)`", "\n".join(kept))
    ours = re.compile(r"^(oelm-ray \w|python (sweeps|benchmarks)/)")
    return [s for s in spans if ours.match(s) and "..." not in s and " / " not in s]


def _commands(line: str) -> list[list[str]]:
    """The commands of ours in one shell line: `&&` chains, env prefixes, `ray exec '<cmd>'` and
    `ray job submit -- <cmd>` unwrapped; `<placeholder>` becomes x, an optional `[ARG]` is dropped."""
    line = re.sub(r"<[^>]+>", "x", line)
    words = [w for w in shlex.split(line, comments=True) if not re.fullmatch(r"\[[A-Z_]+\]", w)]
    cmds, cur = [], []
    for w in [*words, "&&"]:
        if w in ("&&", ";", "|"):
            if cur:
                cmds.append(cur)
            cur = []
        elif cur or not re.fullmatch(r"[A-Z_]+=\S*", w):  # VAR=value before a command
            cur.append(w)
    out = []
    for c in cmds:
        if c[:2] == ["ray", "exec"] and len(c) >= 4:
            out += _commands(c[3])
        elif c[:3] == ["ray", "job", "submit"] and "--" in c:
            out.append(c[c.index("--") + 1 :])
        else:
            out.append(c)
    return out


class _Parsed(BaseException):
    """Raised in place of running a command once its arguments parsed."""


@contextlib.contextmanager
def _parse_only():
    real = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        real(self, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = real


def parses(cmd: list[str]) -> str | None:
    """None if the command's own parser accepts it, else what went wrong."""
    from oelm_ray import cli

    prog = cmd[0]
    if prog in NOT_OURS:
        return None
    if prog == "oelm-ray":
        run = lambda: cli.main(cmd[1:])  # noqa: E731
    elif prog == "python" and len(cmd) > 1 and cmd[1].endswith(".py"):
        script = ROOT / cmd[1]
        if not script.is_file():
            return f"{cmd[1]} does not exist"
        argv = sys.argv

        def run():
            sys.argv = [str(script), *cmd[2:]]
            try:
                runpy.run_path(str(script), run_name="__main__")
            finally:
                sys.argv = argv
    elif prog == "python" and cmd[1:2] == ["-m"]:
        return None if cmd[2] in ("pytest", "oelm_ray") else f"unknown module {cmd[2]}"
    elif prog == "bash":
        return None if (ROOT / cmd[1]).is_file() else f"{cmd[1]} does not exist"
    else:
        return f"unknown program {prog!r}: add it to NOT_OURS if it is not ours"
    with _parse_only():
        try:
            run()
        except _Parsed:
            return None
        except SystemExit as e:
            return None if e.code == 0 else f"exit {e.code}"  # --help exits 0
    return "ran without parsing arguments"


def _documented() -> list[tuple[str, list[str]]]:
    out = []
    for page in PAGES:
        text = page.read_text()
        for line in _fenced(text):
            out += [(f"{page.relative_to(ROOT)}: {line.strip()}", c) for c in _commands(line)]
        for span in _inline(text):  # a bare `oelm-ray train` names the subcommand: it must exist
            out += [(f"{page.relative_to(ROOT)}: `{span}`", c + ["--help"] * (len(c) == 2)) for c in _commands(span)]
    return out


def test_every_documented_command_parses(capsys):
    cmds = _documented()
    ours = [c for _, c in cmds if c[0] not in NOT_OURS]
    assert len(ours) >= 25, "the scan found too few commands: it is broken"
    bad = []
    for where, c in cmds:
        why = parses(c)
        if why:
            bad.append(f"{where} -> {why}")
    capsys.readouterr()
    assert not bad, "\n".join(bad)


def test_the_command_check_can_fail(capsys):
    assert parses(["oelm-ray", "train", "--no-such-flag"]) == "exit 2"
    assert parses(["python", "sweeps/phase3.py", "--preset", "no-such-preset"]) == "exit 2"
    assert parses(["python", "sweeps/nope.py"]) == "sweeps/nope.py does not exist"
    assert parses(["python", "sweeps/phase3.py", "--preset", "paper"]) is None
    assert _commands("RAY_ADDRESS=<head>:6379 python sweeps/phase3.py --storage /s  # c") == [
        ["python", "sweeps/phase3.py", "--storage", "/s"]
    ]
    assert _commands("ray exec cluster.yaml 'oelm-ray status --storage /s'") == [
        ["oelm-ray", "status", "--storage", "/s"]
    ]
    capsys.readouterr()


def test_readme_is_short_and_maps_every_doc():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"the README's map lacks docs/{page.name}"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_links_between_pages_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page.read_text()):
        assert (page.parent / target).is_file(), f"{page.name} links to {target}, which does not exist"
