"""Shared fixtures: a small real corpus (a slice of the standard library) and a private cache."""

from __future__ import annotations

import random
import shutil
import sysconfig
from pathlib import Path

import pytest

from loom.config import load_config

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Keep tokenizers, token files and the CPU peak probe out of the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LOOM_CACHE", str(tmp_path_factory.mktemp("loom-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """About 1 MB of real Python: four standard-library packages."""
    root = tmp_path_factory.mktemp("corpus")
    for pkg in ("json", "email", "logging", "asyncio"):
        for f in sorted((STDLIB / pkg).glob("*.py")):
            shutil.copy(f, root / f"{pkg}_{f.name}")
    return root


@pytest.fixture
def loom_cli(capfd, monkeypatch):
    """``loom_cli(*args, cwd=None)``: the ``loom`` command run in this process (no interpreter or torch
    start-up: the checks before launch cost milliseconds, a subprocess seconds) -> (exit code, stdout,
    stderr). The ``loom`` logger is put back afterwards, so later tests' ``caplog`` still sees it."""
    import logging

    from loom.cli import main

    logger = logging.getLogger("loom")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")

    def run(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capfd.readouterr()
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's own errors
            code = e.code
        out, err = capfd.readouterr()
        return code, out, err

    yield run
    logger.handlers[:], logger.propagate, logger.level = saved


TINY_OVERRIDES = [
    "model=gpt-tiny", "train.steps=8", "train.batch_size=4", "train.log_every=1", "train.eval_every=4",
    "train.eval_batches=2", "train.ckpt_every=4", "train.warmup_steps=2", "train.progress=none",
]


@pytest.fixture
def tiny_config(tiny_corpus, tmp_path):
    """``tiny_config(*overrides)``: gpt-tiny on the tiny corpus in a fresh run directory,
    small enough for several steps a second on a CPU."""

    def make(*overrides: str, run_dir: Path | None = None):
        run = run_dir or tmp_path / "run"
        return load_config(None, [*TINY_OVERRIDES, f"data.path={tiny_corpus}", f"train.run_dir={run}", *overrides])

    return make


ZH_SUBJECTS = ["我们", "他们", "小明", "老师", "学生们", "这家公司", "政府", "科学家", "我的朋友"]
ZH_TIMES = ["今天", "昨天", "明年", "每天早上", "在北京", "在学校里", "非常认真地", "经常"]
ZH_VERBS = ["喜欢", "研究", "讨论", "发展", "学习", "建设", "介绍", "关心", "支持"]
ZH_OBJECTS = ["人工智能", "中国文化", "经济问题", "自然语言处理", "历史", "数学", "音乐", "环境保护"]
ZH_ENDS = ["。", "！", "？", "，而且很有意思。", "，但是还不够。"]


def _chinese_lines(n: int, seed: int = 0) -> list[str]:
    """Return ``n`` varied Chinese sentences."""
    rng = random.Random(seed)
    parts = (ZH_SUBJECTS, ZH_TIMES, ZH_VERBS, ZH_OBJECTS, ZH_ENDS)
    return ["".join(rng.choice(p) for p in parts) for _ in range(n)]


@pytest.fixture(scope="session")
def chinese_lines():
    """``chinese_lines(n, seed=0)``: ``n`` varied Chinese sentences, for PanGu-α's tokenizer."""
    return _chinese_lines
