import pytest

from loom.config import ConfigError, config_to_yaml, load_config
from loom.models import DEFAULT_PRESET, presets

PRESETS = presets()


def test_defaults_are_the_default_preset():
    cfg = load_config()
    assert cfg.model.preset == DEFAULT_PRESET
    assert cfg.model.n_layer == PRESETS[DEFAULT_PRESET]["n_layer"]


def test_preset_then_overrides_win():
    cfg = load_config(None, ["model=pangu-mini", "model.n_layer=3", "train.steps=7"])
    assert cfg.model.arch == "pangu" and cfg.model.n_layer == 3 and cfg.train.steps == 7
    assert cfg.model.n_embd == PRESETS["pangu-mini"]["n_embd"]


def test_yaml_file_then_command_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: pangu-tiny\ntrain:\n  steps: 11\n  lr: 0.01\n")
    cfg = load_config(f, ["train.lr=0.02"])
    assert cfg.model.preset == "pangu-tiny" and cfg.train.steps == 11 and cfg.train.lr == 0.02


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["model=pangu-tiny", "model.n_embd=96", "model.n_head=3", "train.precision=bf16"])
    f = tmp_path / "config.yaml"
    f.write_text(config_to_yaml(cfg))
    assert load_config(f) == cfg


@pytest.mark.parametrize("overrides, fragment", [
    (["model.n_layerz=3"], "unknown key 'model.n_layerz'"),
    (["modle.n_layer=3"], "unknown key 'modle'"),
    (["train.steps=abc"], "train.steps"),
    (["train.precision=fp8"], "train.precision='fp8' is not valid; choose one of: fp32, bf16, fp16"),
    (["model=gpt-5"], "model='gpt-5' is not a known preset"),
    (["model.n_head=5"], "model.n_embd=192 is not divisible by model.n_head=5"),
    (["train.batch_size=10", "train.grad_accum=3"], "train.batch_size=10 is not divisible by train.grad_accum=3"),
    (["train.steps=0"], "train.steps=0 must be a finite number in [1, inf)"),
    (["train.lr=inf"], "train.lr=inf must be a finite number in (0, inf)"),
    (["train.grad_clip=nan"], "train.grad_clip=nan must be a finite number"),
    (["train.eps=-1"], "train.eps=-1.0 must be a finite number in (0, inf)"),
    (["model.layer_norm_eps=0"], "model.layer_norm_eps=0.0 must be a finite number in (0, inf)"),
    (["train.seed=-1"], "train.seed=-1 must be a finite number in [0, 4294967295]"),
    (["model.vocab_size=100"], "model.vocab_size=100 must be a finite number in [257, inf)"),
    (["train.device=gpu"], "train.device='gpu' is not valid"),
    (["train=3"], "'train' is a section of settings, not a value"),
    (["model=pangu-tiny", "model.n_layer=1"], "PanGu-α needs at least 2 layers"),
    (["train.lr=0.1", "train.min_lr=0.5"], "train.min_lr=0.5"),
    (["steps"], "not of the form key=value"),
])
def test_bad_config_is_one_clear_line(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert fragment in msg
    assert "\n" not in msg


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'n_layer'"):
        load_config(None, ["model.n_layers=3"])


def test_missing_or_broken_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
