import pytest

from loom.config import ConfigError, load_config
from loom.parallel.launch import resolve_device
from loom.train.rundir import new_run_dir


def test_default_run_dirs_never_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["model=gpt-tiny"])
    dirs = {new_run_dir(cfg) for _ in range(3)}  # the same second, the same preset
    assert len(dirs) == 3 and all(d.is_dir() and d.parent.name == "runs" for d in dirs)


def test_explicit_run_dir_is_taken_as_given(tmp_path):
    cfg = load_config(None, [f"train.run_dir={tmp_path / 'mine'}"])
    assert new_run_dir(cfg) == tmp_path / "mine"


@pytest.mark.parametrize("name, fragment", [
    ("tpu", "is not valid"), ("cuda:99", "CUDA device"), ("meta", "is not valid"),
])
def test_devices_that_are_not_here_are_config_errors(name, fragment):
    with pytest.raises(ConfigError, match=fragment):
        resolve_device(name, key="--device")


def test_cpu_and_auto_resolve():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
