"""The repository itself: README commands match CI, the options table is current, no secrets."""

import re
import subprocess
from pathlib import Path

from oelm_ray.config import options_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert blocks[0].strip() == 'pip install torch==2.13.0 -e . && python sweeps/phase3.py'
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == blocks[1].strip()


def test_readme_options_table_is_current():
    assert options_markdown() in (ROOT / "README.md").read_text()


KEY_PATTERNS = [
    re.compile(r"(WANDB_API_KEY|api_key|token)\s*[=:]\s*[\"']?[0-9a-f]{32,}", re.I),  # W&B keys are 40 hex chars
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\b(ghp|gho|hf)_[A-Za-z0-9]{20,}"),
    re.compile(r"AKIA[0-9A-Z]{16}"),
]


def test_no_secrets_in_tracked_files():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert files, "not a git checkout"
    hits = []
    for f in files:
        try:
            text = (ROOT / f).read_text(errors="ignore")
        except (IsADirectoryError, FileNotFoundError):
            continue
        hits += [f"{f}: {p.pattern}" for p in KEY_PATTERNS if p.search(text)]
    assert not hits, hits


def test_secret_scan_would_catch_a_key():
    fake = "WANDB_API_KEY=" + "0123456789abcdef" * 2 + "01234567"
    assert any(p.search(fake) for p in KEY_PATTERNS)
