"""A pipeline carries whatever a family's stages pass on, not only one hidden-state tensor: a toy family
whose stages hand each other a pair of tensors (as an encoder-decoder passes the encoder's output
along with the decoder's states) trains under pp=2 with the loss and gradients of one process, and
evaluates through the stages to the same outputs."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from loom.models import ModelConfig, ModelSpec, PipelineSplit, Sharding, build_model, register, registry, spec_of
from loom.parallel.pipeline import build_pipeline, stage_layout, stage_module
from tests.distributed.parity import ATOL, RTOL

ARCH = "toy-pair"


class PairBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.mix = nn.Linear(d, d)
        self.side = nn.Linear(d, d, bias=False)

    def forward(self, h: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return h + torch.tanh(self.mix(h) + self.side(memory)), memory


class PairNet(nn.Module):
    """inputs (B, T) ids -> (hidden, memory) -> blocks that read both -> a linear head on hidden."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.memory = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.layers = nn.ModuleDict({str(i): PairBlock(cfg.n_embd) for i in range(cfg.n_layer)})
        self.out = nn.Linear(cfg.n_embd, 3)

    def embed(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.emb(idx)
        return h, torch.sigmoid(self.memory(h))

    def head(self, h: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return self.out(h * memory)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        state = self.embed(idx)
        for block in self.layers.values():
            state = block(*state)
        return self.head(*state)

    def tie_weights(self) -> None:
        pass


def _register() -> ModelSpec:
    try:
        return spec_of(ARCH)
    except Exception:
        return register(ModelSpec(name=ARCH, build=PairNet, presets={}, sharding=Sharding(table={}),
                                  pipeline=PipelineSplit(first=("emb", "memory"), last=("out",))))


def _cfg() -> ModelConfig:
    return ModelConfig(preset=ARCH, arch=ARCH, n_layer=4, n_embd=8, vocab_size=11, block_size=6)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def _worker() -> dict:
    spec = _register()
    cfg = _cfg()
    torch.manual_seed(0)
    ref = build_model(cfg, device="cpu").double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (4, cfg.block_size), generator=gen)
    y = torch.randn(4, cfg.block_size, 3, generator=gen, dtype=torch.float64)
    pipe = build_pipeline(build_model(cfg).double(), spec.pipeline_split(cfg), dist.group.WORLD, schedule="1f1b",
                          microbatches=2, virtual_stages=1, loss_fn=_loss, device="cpu")
    for m in pipe.modules:  # the reference's weights, by name
        m.to_empty(device="cpu")
        m.load_state_dict(ref.state_dict(), strict=False)
    loss = pipe.step((x,), y)
    ref_loss = _loss(ref(x), y)
    ref_loss.backward()
    ref_grads = dict(ref.named_parameters())
    grads = {n: (p.grad, ref_grads[n].grad) for m in pipe.modules for n, p in m.named_parameters()}
    with torch.no_grad():
        out, ref_out = pipe.forward((x,)), ref(x)
    return {"loss": loss, "ref_loss": ref_loss.detach(), "grads": grads, "out": out, "ref_out": ref_out,
            "last": pipe.is_last}


@pytest.fixture
def toy_family():
    """The toy family, registered for this test only."""
    spec = _register()
    yield spec
    registry._FAMILIES.pop(ARCH, None)


def test_a_pair_of_tensors_travels_through_the_stages_in_one_process(toy_family):
    spec = toy_family
    cfg = _cfg()
    model = build_model(cfg, device="cpu")
    x = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    state = x
    for s in stage_layout(cfg, 3):
        stage = stage_module(model, spec.pipeline_split(cfg), s)
        state = stage(*(state if isinstance(state, tuple) else (state,)))
        assert isinstance(state, tuple) != s.head  # a pair between stages, the output after the last
    torch.testing.assert_close(state, model(x), rtol=0, atol=0)


def two_rank_job(tmp_dir: str) -> dict:
    """This suite's part of the session's two-rank job (tests/distributed/shared_job.py): the toy family
    is registered for it only."""
    try:
        return _worker()
    finally:
        registry._FAMILIES.pop(ARCH, None)


def test_a_pair_of_tensors_travels_through_a_two_rank_pipeline(two_rank_job):
    ranks = two_rank_job["test_pipeline_state"]
    assert sum(r["last"] for r in ranks) == 1
    seen = set()
    for r in ranks:
        if r["last"]:
            torch.testing.assert_close(r["loss"], r["ref_loss"], rtol=RTOL, atol=0)
            torch.testing.assert_close(r["out"], r["ref_out"], rtol=RTOL, atol=ATOL)
        else:
            assert r["loss"] is None and r["out"] is None
        for name, (got, want) in r["grads"].items():
            torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
            seen.add(name)
    assert seen == {n for n, _ in PairNet(_cfg()).named_parameters()}  # every parameter, on some rank
