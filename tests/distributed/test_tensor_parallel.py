"""Tensor and sequence parallelism over 2 gloo processes reproduce the single-process loss and gradients
(float64, at the parity suite's tolerance: tests/distributed/parity.py)."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.parity import ATOL, RTOL

SHRINK = ["model.block_size=16", "model.dropout=0.0"]
MINDSPORE = {  # PanGu-α's reference strategies, in MindSpore's notation
    "layers.*.attn.[qkv]_proj": "((dp,1),(mp,1))",
    "layers.*.attn.out_proj": "((dp, mp), (mp, 1))",
    "layers.*.mlp.fc": "((dp,1),(mp,1))",
    "layers.*.mlp.proj": "((dp,mp),(mp,1))",
    "top_query_layer.*_proj": "((1,1),(2,1))",  # integers: 2 = parallel.tp
    "top_query_layer.*.out_proj": "((1,2),(1,2))",
    "top_query_layer.mlp.proj": "((dp,tp),(tp,1))",
}
PANGU_REPLICATED = {"top_query_emb": "vocab", "top_query_layer.attn.*": "replicate", "tok_emb": "replicate",
                    "lm_head": "replicate"}
REPLICATED = {"tok_emb": "replicate", "lm_head": "replicate", "pos_emb": "vocab", "layers.1.mlp.*": "replicate",
              "layers.0.attn.*": "replicate"}
# name, preset, sequence parallel, overrides, parallelize on the meta device
CASES = [
    ("gpt", "gpt-tiny", False, {}, False),
    ("gpt-sp", "gpt-tiny", True, {}, False),
    ("gpt-replicated", "gpt-tiny", False, REPLICATED, False),
    ("gpt-replicated-sp", "gpt-tiny", True, REPLICATED, False),
    ("pangu", "pangu-tiny", False, {}, False),
    ("pangu-sp", "pangu-tiny", True, {}, False),
    ("pangu-mindspore-sp", "pangu-tiny", True, MINDSPORE, False),
    ("pangu-replicated-sp", "pangu-tiny", True, PANGU_REPLICATED, False),
    ("pangu-meta-sp", "pangu-tiny", True, {}, True),
]


def _worker(cases) -> dict:
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, distribute_tensor

    from loom.config import load_config
    from loom.models import build_model, materialize, spec_of
    from loom.parallel.strategy import resolve_strategies
    from loom.parallel.tensor import apply_tensor_parallel, loss_context
    from loom.tasks import lm_loss

    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    out = {}
    for name, preset, sp, overrides, on_meta in cases:
        cfg = load_config(None, [f"model={preset}", *SHRINK]).model
        gen = torch.Generator().manual_seed(1)
        idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=gen)
        tgt = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=gen)

        ref = materialize(build_model(cfg).double(), "cpu", seed=0)
        ref_loss = F.cross_entropy(ref(idx).flatten(0, 1), tgt.flatten())
        ref_loss.backward()

        sharding = spec_of(cfg).sharding
        strategies = resolve_strategies(build_model(cfg), sharding.table, overrides, tp=2, dp=1)
        if on_meta:  # as the trainer does: split first, allocate and initialize the shards after
            model = build_model(cfg).double()
            apply_tensor_parallel(model, mesh, strategies, sequence_parallel=sp, sharding=sharding)
            model.to_empty(device="cpu")
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.to_local().copy_(distribute_tensor(ref.get_parameter(n).detach(), mesh, p.placements,
                                                         src_data_rank=None).to_local())
        else:
            model = materialize(build_model(cfg).double(), "cpu", seed=0)
            apply_tensor_parallel(model, mesh, strategies, sequence_parallel=sp, sharding=sharding)
        seen = {}  # the residual stream between blocks: this rank's half of the sequence under sp
        model.layers["0"].register_forward_hook(lambda m, a, y: seen.update(stream=tuple(y.shape)))
        with loss_context(model):
            logits = model(idx)
            loss = lm_loss(logits, tgt)
            loss.backward()
        out[name] = {
            "loss": loss.item(), "ref_loss": ref_loss.item(),
            "vocab_split_logits": isinstance(logits, DTensor),
            "tied": model.lm_head.weight is model.tok_emb.weight,
            "stream": seen["stream"], "expected_stream": (2, cfg.block_size // 2 if sp else cfg.block_size, cfg.n_embd),
            "names": sorted(n for n, _ in model.named_parameters()),
            "ref_names": sorted(n for n, _ in ref.named_parameters()),
            "placements": {n: p.placements for n, p in model.named_parameters()},
            "grads": {n: p.grad.full_tensor() for n, p in model.named_parameters()},
            "ref_grads": {n: p.grad for n, p in ref.named_parameters()},
            "strategies": strategies,
        }
    return out


def two_rank_job(tmp_dir: str) -> dict:
    """This suite's part of the session's two-rank job (tests/distributed/shared_job.py)."""
    return _worker(CASES)


@pytest.fixture(scope="module")
def results(two_rank_job):
    return two_rank_job["test_tensor_parallel"]


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_loss_and_gradients_equal_single_process(results, case):
    for rank, r in enumerate(results):
        got = r[case]
        assert got["names"] == got["ref_names"]  # no parameter renamed
        assert got["tied"]
        assert got["stream"] == got["expected_stream"]
        assert all(p[0].is_shard() or p[0].is_replicate() for p in got["placements"].values())
        assert got["loss"] == pytest.approx(got["ref_loss"], rel=RTOL), f"rank {rank}"
        for n, g in got["grads"].items():
            torch.testing.assert_close(g, got["ref_grads"][n], rtol=RTOL, atol=ATOL, msg=lambda m: f"{n}: {m}")


def test_layouts(results):
    r = results[0]
    assert r["gpt"]["vocab_split_logits"] and not r["gpt-replicated"]["vocab_split_logits"]
    p = r["pangu-sp"]["placements"]
    assert p["tok_emb.weight"][0].is_shard(0)
    assert p["layers.0.attn.q_proj.weight"][0].is_shard(0) and p["layers.0.mlp.proj.weight"][0].is_shard(1)
    assert p["top_query_layer.attn.out_proj.weight"][0].is_shard(1) and p["top_query_emb.weight"][0].is_replicate()
    assert r["gpt-replicated"]["placements"]["layers.0.attn.q_proj.weight"][0].is_replicate()
    # MindSpore's notation resolves to the built-in plan and places every parameter the same way
    assert r["pangu-mindspore-sp"]["strategies"] == r["pangu-sp"]["strategies"]
    assert r["pangu-mindspore-sp"]["placements"] == r["pangu-sp"]["placements"]
