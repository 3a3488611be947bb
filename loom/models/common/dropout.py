"""Dropout on a tensor that tensor parallelism splits: a different mask on each shard.

Every tp rank of a model replica starts from the same seed, so a dropout draws the same mask on each
rank. That is what a tensor *replicated* over tp needs (its copies must stay equal), but a tensor
*split* over tp (attention probabilities of this rank's heads; under sequence parallelism, this rank's
slice of the residual stream) would then repeat one mask on every shard. Megatron-LM (Shoeybi et al.
2019) draws those from a second generator seeded per tp rank; here the per-shard generator state is
derived on the spot from the default one, so that it needs no state of its own: :func:`shard_rng`
draws one number from the CPU default generator (the same on every tp rank, which keeps the ranks'
default generators in step), seeds the device's generator with it plus ``stream`` (the tp rank) for
the duration, then restores that generator. Activation recomputation (``torch.utils.checkpoint``
restores the default generators before it reruns a block) and resuming from a checkpoint (which
saves the default generators) therefore replay the same masks. The model stays single-device:
:mod:`loom.parallel.tensor` sets ``stream`` on the modules whose dropout reads a split tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_SEED_RANGE = 2**62  # + stream stays below the generator's 2**64


@contextlib.contextmanager
def shard_rng(stream: int | None, device: torch.device) -> Iterator[None]:
    """Within: ``device``'s default generator draws the masks of shard ``stream`` (None: leave it alone)."""
    if stream is None:
        yield
        return
    base = int(torch.randint(0, _SEED_RANGE, (1,)).item())  # the CPU generator, advanced alike on every rank
    if device.type == "cuda":
        gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    else:
        gen = torch.default_generator
    state = gen.get_state()
    gen.manual_seed(base + stream)
    try:
        yield
    finally:
        gen.set_state(state)


def on_shard(dropout: nn.Dropout, stream: int):
    """``dropout``'s forward, drawing its mask as shard ``stream`` (:func:`shard_rng`) when it drops anything."""
    forward = dropout.forward

    def run(x: torch.Tensor) -> torch.Tensor:
        if not (dropout.training and dropout.p):  # draws nothing: leave the generators as they are
            return forward(x)
        with shard_rng(stream, x.device):
            return forward(x)

    return run
