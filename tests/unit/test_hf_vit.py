"""Hugging Face ViT: a tiny random ``ViTForImageClassification``, saved with ``save_pretrained``, is the
same model in loom (classification logits; the patch convolution, [CLS] and position tables stored in
other shapes than loom's), and exported back ``transformers``' Auto class loads it with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")  # the test extra; loom's import and export do not need it

from loom.config import load_config  # noqa: E402
from loom.errors import ConfigError  # noqa: E402
from loom.models import build_model  # noqa: E402
from loom.models.hf import hf_model_settings  # noqa: E402
from loom.train.hf import check_hf_weights, load_hf_weights  # noqa: E402
from tests.hf_models import imported, vit_dir  # noqa: E402

TOL = 1e-4


def images(seed: int) -> torch.Tensor:
    return torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit")
    return path, vit_dir(path)


def test_imported_vit_gives_transformers_logits(vit):
    path, ref = vit
    cfg, model = imported(path)
    m = cfg.model
    assert (m.arch, m.n_layer, m.n_embd, m.image_size, m.patch_size, m.channels, m.n_classes) == ("vit", 2, 32, 8, 2,
                                                                                                  3, 5)
    assert (m.post_ln, m.layer_norm_eps, m.activation, m.block_size) == (False, 1e-12, "gelu", 17)
    x = images(1)
    with torch.no_grad():
        assert (model(x) - ref(pixel_values=x).logits).abs().max().item() <= TOL
        # the check can fail: loom's tanh-approximate GELU (its default) is another model
        _, tanh = imported(path, ["model.activation=gelu_tanh"])
        assert (tanh(x) - ref(pixel_values=x).logits).abs().max().item() > TOL


def test_imported_then_exported_vit_loads_in_transformers_with_the_same_logits(vit, tmp_path):
    from transformers import AutoModelForImageClassification

    from loom.infer.hf import export_hf
    from loom.train.hf import import_hf

    path, ref = vit
    out = export_hf(import_hf(path, tmp_path / "run"), tmp_path / "hf")
    assert not (tmp_path / "run" / "tokenizer").exists() and not (out / "tokenizer.json").exists()
    back = AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(back) is type(ref)
    x = images(2)
    with torch.no_grad():
        assert (back(pixel_values=x).logits - ref(pixel_values=x).logits).abs().max().item() <= TOL


def test_a_vit_option_loom_lacks_is_one_clear_error(tmp_path, vit):
    path, ref = vit
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "qkv_bias": False}))
    with pytest.raises(ConfigError, match="qkv_bias=False is not supported by loom's ViT"):
        hf_model_settings(tmp_path)
    ref.save_pretrained(tmp_path)  # weights of 8x8 images under a config of 16x16 ones
    (tmp_path / "config.json").write_text(json.dumps({**config, "image_size": 16}))
    cfg = load_config(None, settings=hf_model_settings(tmp_path))
    with pytest.raises(ConfigError, match="position_embeddings' has shape .* config.json and the weights disagree"):
        check_hf_weights(tmp_path, cfg.model)


def test_a_shard_of_a_reshaped_tensor_is_its_part(vit, monkeypatch):
    """Each rank keeps its part of a tensor stored in another shape (the patch kernel, the [CLS] and
    position tables): a rank holding the second half of every parameter's rows (as ZeRO's dim-0
    shards) gets the second half of each."""
    from loom.train import hf

    path, _ = vit
    cfg, whole = imported(path)
    model = build_model(cfg.model, "cpu")
    model.init_weights(1)
    monkeypatch.setattr(hf, "_local", lambda p: (p[p.shape[0] // 2:], (p.shape[0] // 2, *[0] * (p.dim() - 1))))
    load_hf_weights([model], cfg.model, path)
    ours, theirs = dict(model.named_parameters()), dict(whole.named_parameters())
    for name in ("patch_proj.weight", "pos_emb.weight", "cls_emb.weight", "layers.0.attn.q_proj.weight"):
        half = theirs[name].shape[0] // 2
        assert torch.equal(ours[name][half:], theirs[name][half:]), name
    assert not torch.equal(ours["pos_emb.weight"][:8], theirs["pos_emb.weight"][:8])  # the other rank's half


def test_a_gpt2_with_exact_gelu_imports_and_exports_it(tmp_path):
    """GPT-2's activation_function=gelu is model.activation=gelu, and goes back out as it came."""
    from transformers import AutoModelForCausalLM

    from loom.infer.hf import export_hf
    from loom.train.hf import import_hf
    from tests.hf_models import VOCAB, gpt2_dir

    path = tmp_path / "gpt2"
    gpt2_dir(path, ["def f(x):\n    return x + 1\n"] * 20)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "activation_function": "gelu"}))
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    cfg, model = imported(path)
    assert cfg.model.activation == "gelu"
    out = export_hf(import_hf(path, tmp_path / "run"), tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["activation_function"] == "gelu"
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x) - ref(x).logits).abs().max().item() <= TOL
        assert (AutoModelForCausalLM.from_pretrained(out)(x).logits - ref(x).logits).abs().max().item() <= TOL


def test_loom_predict_with_an_imported_vit_gives_transformers_answer_and_label_names(vit, tmp_path, loom_cli):
    import numpy as np
    from PIL import Image

    from loom.tasks.image_classification import read_image

    path, ref = vit
    code, _, err = loom_cli("import", str(path), "--out", str(tmp_path / "run"))
    assert code == 0, err
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)).save(img)
    code, out, err = loom_cli("predict", str(tmp_path / "run"), "--image", str(img), "--top-k", "2", "--json")
    assert code == 0, err
    with torch.no_grad():
        probs = torch.softmax(ref(pixel_values=torch.from_numpy(read_image(img, 8, 3))[None]).logits[0], -1)
    p, k = probs.topk(2)
    names = ref.config.id2label  # LABEL_0 ... as transformers names them
    assert [(t["label"], round(t["probability"], 4)) for t in json.loads(out)["top"]] == \
        [(names[i], round(q, 4)) for q, i in zip(p.tolist(), k.tolist())]
