"""Turning a token array into training and evaluation batches.

Training batches are random windows drawn from a generator seeded with
``(seed, step)``, so the batch of any optimizer step can be recomputed from
the step number alone: no sampler state needs saving to resume a run.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from loom.data.corpus import DataError

Batch = tuple[torch.Tensor, torch.Tensor]


def _check_positive(**values: int) -> None:
    """Raise DataError naming the first of ``values`` that is not positive."""
    for name, value in values.items():
        if value < 1:
            raise DataError(f"{name} must be at least 1, got {value}")


def _check_length(tokens: np.ndarray, block_size: int) -> None:
    """Raise DataError unless ``tokens`` holds at least one window."""
    if len(tokens) < block_size + 1:
        raise DataError(
            f"only {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}: "
            "use a smaller block_size or more data"
        )


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> Batch:
    """Return inputs and next-token targets of the windows beginning at ``starts``."""
    index = starts[:, None] + np.arange(block_size + 1)
    windows = torch.from_numpy(np.array(tokens[index], dtype=np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class BatchSampler:
    """Stateless, deterministic sampler of random training windows.

    The global batch of optimizer step ``step`` is ``batch_size`` windows of
    ``block_size + 1`` tokens whose start offsets are drawn from
    ``np.random.default_rng([seed, step])``.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int) -> None:
        """Sample from ``tokens`` (e.g. a memmap); see the class docstring.

        Raises:
            DataError: ``tokens`` is shorter than ``block_size + 1``, or a
                size is not positive.
        """
        _check_positive(block_size=block_size, batch_size=batch_size)
        _check_length(tokens, block_size)
        self.tokens = tokens
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed

    def starts(self, step: int) -> np.ndarray:
        """Return the start offsets of the ``batch_size`` windows of ``step``."""
        if step < 0:
            raise DataError(f"step must be non-negative, got {step}")
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)

    def batch(self, step: int, rows: slice | None = None) -> Batch:
        """Return ``(x, y)`` int64 tensors of shape (B, block_size) for ``step``.

        ``y`` is ``x`` shifted by one token. ``rows`` selects a sub-range of
        the global batch (a gradient-accumulation micro-batch or a
        data-parallel rank's share) without changing the global batch.
        """
        starts = self.starts(step)
        if rows is not None:
            starts = starts[rows]
        return _windows(self.tokens, starts, self.block_size)


def _eval_iter(
    tokens: np.ndarray, block_size: int, batch_size: int, n_windows: int
) -> Iterator[Batch]:
    """Yield batches of the first ``n_windows`` consecutive windows."""
    for first in range(0, n_windows, batch_size):
        window_ids = np.arange(first, min(first + batch_size, n_windows))
        yield _windows(tokens, window_ids * block_size, block_size)


def eval_batches(
    tokens: np.ndarray, block_size: int, batch_size: int, max_batches: int | None = None
) -> Iterator[Batch]:
    """Iterate over sequential, non-overlapping windows from the start of ``tokens``.

    Window ``i`` has inputs ``tokens[i*T:(i+1)*T]`` and targets shifted by
    one (``T = block_size``), so every target token is scored at most once.
    At most ``max_batches`` batches (all windows if None); the last batch
    may be smaller than ``batch_size``. There is no randomness.

    Raises:
        DataError: ``tokens`` is shorter than ``block_size + 1``, or a size
            is not positive (raised here, not when iterating).
    """
    _check_positive(block_size=block_size, batch_size=batch_size)
    _check_length(tokens, block_size)
    n_windows = (len(tokens) - 1) // block_size
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    return _eval_iter(tokens, block_size, batch_size, n_windows)
