"""The layering is kept by tools, not by memory: the import contracts of pyproject.toml hold, and no
module of a model family is named outside the family's own folder (docs/architecture.md)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import loom
from loom.config import load_config
from loom.models import build_model, families, spec_of

ROOT = Path(loom.__file__).resolve().parents[1]
PACKAGE = ROOT / "loom"


def _lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the project at ``root`` (its pyproject.toml, its ``loom``)."""
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=120)


def test_import_contracts_hold():
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "broken" in done.stdout and "0 broken" in done.stdout


def test_an_upward_import_breaks_the_contracts(tmp_path):
    """The check can fail: a copy of loom whose model code imports the trainer is refused."""
    shutil.copytree(PACKAGE, tmp_path / "loom", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    spec = tmp_path / "loom" / "models" / "spec.py"
    spec.write_text(spec.read_text() + "\nfrom loom.train import trainer  # noqa\n")
    done = _lint(tmp_path)
    assert done.returncode != 0 and "loom.models.spec -> loom.train.trainer" in done.stdout, done.stdout[-3000:]


def _family_module_names() -> dict[str, set[str]]:
    """Per family, the names of its model's own top-level modules that hold weights, but for the
    block container (a word every layer of loom uses for other things)."""
    out = {}
    for name, spec in families().items():
        preset = next(iter(spec.presets))
        model = build_model(load_config(None, [f"model={preset}"]).model)
        out[name] = {child for child, m in model.named_children()
                     if next(m.parameters(), None) is not None and child != spec.pipeline.blocks}
    return out


def test_every_family_names_modules_of_its_own():
    names = _family_module_names()
    assert names["gpt"] >= {"tok_emb", "pos_emb", "ln_f", "lm_head"}
    assert names["pangu"] >= {"top_query_emb", "top_query_layer"}


def _outside_the_families() -> list[Path]:
    family_folders = [PACKAGE / "models" / name for name in families()]
    return [f for f in sorted(PACKAGE.rglob("*.py")) if not any(d in f.parents for d in family_folders)]


@pytest.mark.parametrize("where", ["parallel", "elsewhere"])
def test_no_family_module_is_named_outside_its_folder(where):
    """``loom/parallel/`` (and every other part of loom) reads a family through its spec: none of the
    names of any family's modules appears in its code, strings, docstrings or comments."""
    words = {w for names in _family_module_names().values() for w in names}
    pattern = re.compile(r"\b(" + "|".join(sorted(words)) + r")\b")
    files = [f for f in _outside_the_families() if (f.parent.name == "parallel") == (where == "parallel")]
    assert len(files) > 5
    found = [f"{f.relative_to(PACKAGE)}:{i}: {line.strip()}" for f in files
             for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_the_check_finds_a_family_name():
    """The check can fail: the family folders themselves name their modules."""
    words = _family_module_names()["gpt"]
    text = (PACKAGE / "models" / "gpt" / "model.py").read_text()
    assert all(re.search(rf"\b{w}\b", text) for w in words)
    assert spec_of("gpt").pipeline.first == ("tok_emb", "pos_emb")


def test_the_plan_is_decided_only_at_the_top():
    """A job's plan is resolved once (``loom.planner.auto.plan_job``, called by the CLI) and handed
    down: nothing in the engine, the trainer or inference makes one again from the config."""
    makers = re.compile(r"\b(resolve_plan|plan_from_config|plan_job|auto_plan)\(")
    found = [f"{f.relative_to(PACKAGE)}:{i}" for f in _outside_the_families()
             for i, line in enumerate(f.read_text().splitlines(), 1)
             if makers.search(line) and not line.lstrip().startswith("def ")]
    allowed = ("cli.py", "planner/auto.py", "planner/calibrate.py", "parallel/plan.py")
    assert found and all(f.startswith(allowed) for f in found), found
