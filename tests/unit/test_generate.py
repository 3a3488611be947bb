import pytest
import torch

from loom.config import load_config
from loom.infer.generate import filter_logits, generate
from loom.models import build_model, materialize


@pytest.fixture(scope="module")
def model():
    cfg = load_config(None, ["model=pangu-tiny"]).model
    return materialize(build_model(cfg), "cpu", seed=3).eval()


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.75))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(probs.log(), top_p=0.01)).sum() == 1  # never empty


def test_cached_generation_equals_recomputation(model):
    prompt = torch.randint(0, 512, (2, 5))
    a = generate(model, prompt, 30, temperature=1.0, top_k=20, top_p=0.9, seed=7, use_cache=True)
    b = generate(model, prompt, 30, temperature=1.0, top_k=20, top_p=0.9, seed=7, use_cache=False)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], prompt) and a.shape == (2, 35)


def test_seed_decides_the_sample(model):
    prompt = torch.zeros(1, 1, dtype=torch.long)
    a, b = (generate(model, prompt, 20, seed=s) for s in (1, 2))
    assert torch.equal(a, generate(model, prompt, 20, seed=1))
    assert not torch.equal(a, b)


def test_greedy_is_argmax_of_full_recomputation(model):
    out = generate(model, torch.zeros(1, 3, dtype=torch.long), 10, temperature=0)
    for t in range(3, 13):
        assert out[0, t] == model(out[:, :t])[0, -1].argmax()


def test_too_long_a_request_is_an_error(model):
    with pytest.raises(ValueError, match="block_size"):
        generate(model, torch.zeros(1, 60, dtype=torch.long), 10)


def test_padded_vocabulary_rows_are_never_sampled():
    # a vocabulary padded past the tokenizer's 500 ids (for tensor parallelism): make the padded rows
    # win every argmax and every draw, then ask for the tokenizer's ids only
    cfg = load_config(None, ["model=gpt-tiny"]).model
    m = materialize(build_model(cfg), "cpu", seed=3).eval()
    with torch.no_grad():
        m.lm_head.weight[500:] = m.lm_head.weight[:1] * 50  # tied to tok_emb: padded ids are never inputs
    idx = torch.zeros(2, 4, dtype=torch.long)
    unrestricted = generate(m, idx, 6, temperature=0)
    assert (unrestricted[:, 4:] >= 500).any()
    for temperature in (0, 1.0):
        out = generate(m, idx, 6, temperature=temperature, seed=0, vocab_size=500)
        assert (out[:, 4:] < 500).all()
