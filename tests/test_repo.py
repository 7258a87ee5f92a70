"""The repository itself: README commands match CI, the options table is current (secrets: test_reliability)."""

import re
from pathlib import Path

from oelm_ray.core.config import options_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert blocks[0].strip() == 'pip install torch==2.13.0 -e . && python sweeps/phase3.py'
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == blocks[1].strip()


def test_readme_options_table_is_current():
    assert options_markdown() in (ROOT / "README.md").read_text()
