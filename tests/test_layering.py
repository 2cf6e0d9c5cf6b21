"""The package's import graph follows docs/architecture.md: no import runs up a layer, the math imports no
distributed code, nothing in the wheel imports test-only code, each file format is named in one module,
and every ``cli.py`` only parses and calls.

These tests inspect source code on purpose: the property under test IS the import graph.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "edlm_dist"

# Each part of edlm_dist and the parts it may import (besides itself). Read bottom-up in
# docs/architecture.md; a part never imports a part listed after it.
BOTTOM = {"errors", "storage", "preemption"}  # below everything: any part may import them
ALLOWED = {
    "errors": set(),
    "fingerprint": set(),
    "storage": {"errors"},
    "preemption": {"errors"},
    "config": BOTTOM,
    "parallel": BOTTOM | {"config", "fingerprint"},
    "data": BOTTOM | {"config"},
    "objectives": BOTTOM,
    "models": BOTTOM | {"config", "parallel", "objectives"},
    "artifacts": BOTTOM | {"config", "parallel", "data", "objectives", "models"},
    "sampling": BOTTOM | {"config", "fingerprint", "parallel", "objectives", "artifacts"},
    "training": BOTTOM | {"config", "parallel", "data", "objectives", "models", "artifacts", "sampling"},
    "evaluation": BOTTOM | {"config", "parallel", "data", "objectives", "models", "artifacts", "sampling"},
    "pipeline": BOTTOM | {"config", "parallel", "data", "objectives", "models", "artifacts", "sampling", "training",
                          "evaluation"},
    "cli": BOTTOM | {"config", "data", "training", "sampling", "evaluation", "pipeline", "artifacts"},
}
# Single-device math: plain PyTorch, no process groups (parallelism lives in edlm_dist/parallel/).
MATH_MODULES = [
    "objectives/schedule.py", "objectives/subs.py", "objectives/losses.py",
    "sampling/categorical.py", "sampling/chunking.py", "sampling/energies.py", "sampling/engine.py",
    "sampling/importance.py", "sampling/mdlm.py", "sampling/streams.py",
    "evaluation/bounds.py", "evaluation/entropy.py", "evaluation/genppl.py", "evaluation/likelihood.py",
    "evaluation/intervals.py",
    "models/layers.py",
]
DISTRIBUTED = ("torch.distributed", "deepspeed", "megatron", "edlm_dist.parallel")
# File names of the on-disk formats and the one module that may spell each.
FORMAT_OWNERS = {
    "manifest.json": {"data/shards.py"},
    "meta.json": {"artifacts/checkpoint.py", "artifacts/weights.py"},
    "samples.jsonl": {"artifacts/samples.py"},
    "summary.json": {"artifacts/samples.py"},
    "model.safetensors": {"artifacts/weights.py", "artifacts/hf_export.py"},
    "ema.safetensors": {"artifacts/weights.py"},
    "edlm_meta.json": {"artifacts/weights.py"},  # weights.py loads models from weights and export folders alike
    "results.json": {"pipeline/run.py"},
    "metrics.json": {"evaluation/report.py"},
}


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, function-local ones included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "edlm_dist":  # `from edlm_dist import x` names a part
                out += [(node.lineno, f"edlm_dist.{alias.name}") for alias in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def test_every_part_of_the_package_has_a_layer():
    assert sorted({_part(p) for p in _sources() if _part(p) != "__init__"}) == sorted(ALLOWED)


def test_no_import_runs_up_a_layer():
    bad = []
    for path in _sources():
        part = _part(path)
        for line, module in _imports(path):
            if not module.startswith("edlm_dist."):
                continue
            target = module.split(".")[1]
            if target != part and target not in ALLOWED.get(part, set()):
                bad.append(f"{path.relative_to(REPO)}:{line} ({part}) imports {module} ({target})")
    assert bad == []


def test_the_math_imports_no_distributed_code():
    bad = [f"edlm_dist/{name}:{line} imports {module}" for name in MATH_MODULES
           for line, module in _imports(PACKAGE / name) if module.startswith(DISTRIBUTED)]
    assert bad == []


def test_nothing_in_the_wheel_imports_test_only_code():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    shipped = find_packages(str(REPO), include=config["tool"]["setuptools"]["packages"]["find"]["include"])
    assert shipped and all(name == "edlm_dist" or name.startswith("edlm_dist.") for name in shipped)
    assert "edlm_dist.testing" not in shipped
    bad = [f"{path.relative_to(REPO)}:{line} imports {module}" for path in _sources()
           for line, module in _imports(path) if module.split(".")[0] in ("tests", "tools", "launchers")]
    assert bad == []


def test_each_file_name_is_spelled_by_its_format_module_only():
    bad = []
    for path in _sources():
        rel = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in FORMAT_OWNERS and rel not in FORMAT_OWNERS[node.value]:
                bad.append(f"edlm_dist/{rel}:{node.lineno} spells {node.value!r}")
    assert bad == []


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*/cli.py")), ids=lambda p: p.parent.name)
def test_every_cli_only_parses_and_calls(path):
    """A package's cli.py holds one function, ``cli_main``, short enough to only map arguments to one call."""
    tree = ast.parse(path.read_text())
    functions = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert [f.name for f in functions] == ["cli_main"]
    assert functions[0].end_lineno - functions[0].lineno < 40
