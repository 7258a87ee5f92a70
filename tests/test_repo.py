"""The repository itself: README commands match CI, the options table is current (secrets: test_security)."""

import re
import sys
from pathlib import Path

from oelm_ray.core.options import options_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert blocks[0].strip() == "pip install torch==2.13.0 -e . && python sweeps/phase3.py"
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == blocks[1].strip()


def test_docs_options_table_is_current():
    assert options_markdown() in (ROOT / "docs" / "options.md").read_text()


def _imports(path: Path, relative: bool = False) -> set[str]:
    """Top-level packages a module imports, at the top or inside functions (relative imports too with
    `relative`, as "." + their module)."""
    import ast

    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and relative:
            out.add("." * node.level + (node.module or ""))
    return out


def test_layers_import_what_the_readme_says():
    core = sorted((ROOT / "oelm_ray" / "core").glob("*.py"))
    assert {p.name for p in core} >= {
        "config.py",
        "model.py",
        "data.py",
        "prepared.py",
        "batches.py",
        "optim.py",
        "train_step.py",
        "trainer.py",
        "checkpoint.py",
        "io.py",
    }
    for p in core:
        assert not _imports(p) & {"ray", "wandb"}, f"{p.name} imports Ray or W&B: oelm_ray/core must run without them"
    for report in ("results.py", "search_report.py"):
        assert not _imports(ROOT / "oelm_ray" / report) & {"ray", "wandb", "torch"}, report
    # cluster/: launcher.py (Ray's own cluster-config validation) and doctor.py import Ray, inside their functions
    # only (the fresh interpreter below); torch_build.py runs under the system python before anything is installed
    cluster = {p.name: _imports(p) for p in (ROOT / "oelm_ray" / "cluster").glob("*.py")}
    assert set(cluster) == {"__init__.py", "doctor.py", "launcher.py", "torch_build.py"}, "a new module: give it a rule"
    assert "ray" in cluster["launcher.py"] and "ray" in cluster["doctor.py"]  # what the docs say imports Ray
    assert not cluster["launcher.py"] & {"torch", "wandb"}
    assert cluster["torch_build.py"] <= set(sys.stdlib_module_names), cluster["torch_build.py"]
    assert not _imports(ROOT / "oelm_ray" / "cluster" / "torch_build.py", relative=True) - cluster["torch_build.py"]
    # the check itself sees an import hidden inside a function
    probe = ROOT / "tests" / "__layer_probe.py"
    try:
        probe.write_text("def f():\n    from ray import tune\n")
        assert _imports(probe) == {"ray"}
    finally:
        probe.unlink()
    # and the package's own modules agree in a fresh interpreter: `oelm-ray status` loads neither torch nor Ray,
    # and `oelm-ray doctor` reports a missing Ray or torch instead of failing to start
    import subprocess

    code = (
        "import sys; import oelm_ray.results, oelm_ray.search_report, oelm_ray.cli, oelm_ray.core.config, oelm_ray.core.options, "
        "oelm_ray.core.experiments, oelm_ray.cluster.doctor, oelm_ray.cluster.launcher, oelm_ray.cluster.torch_build; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch', 'wandb'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def test_metrics_files_are_read_without_torch(tmp_path):
    """The trial adapter reads a run's metrics.jsonl (a retried trial replays it) without importing torch."""
    import subprocess
    import sys

    (tmp_path / "metrics.jsonl").write_text('{"step": 10}\n{"step": 20}\n{"st')  # a torn last line is dropped
    code = (
        "import sys; from oelm_ray.core.io import read_metrics; import oelm_ray.tune.trial; "
        f"rows = read_metrics({str(tmp_path / 'metrics.jsonl')!r}); "
        "print([r['step'] for r in rows], 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[10, 20] False"
