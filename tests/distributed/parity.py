"""Train a tiny model for a few steps under a layout and report what a parity test compares:
the global mean loss of every step and every parameter's full value at the end.

``train_layouts`` runs on every rank of a gloo job (through ``harness.run_on_ranks``) and trains
each layout in turn; ``train_single`` is the one-process reference, run in the test process.

Everything runs in float64 (``train.precision=fp64``) unless a layout says otherwise, and
:func:`assert_matches` holds a layout to float64 rounding (docs/testing.md explains the numbers).
A layout entry ``sabotage:NAME`` breaks the layout on purpose (:data:`SABOTAGE`), to show that the
comparison catches a real layout error.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from loom.config import load_config
from loom.parallel.launch import Process
from loom.parallel.mesh import all_reduce_sum
from loom.parallel.plan import check_plan, resolve_plan
from loom.train.trainer import Trainer

STEPS = 5
# float64 parity: two correct layouts differ by ~1e-14 (summation order); a real error by >1e-4
RTOL = 1e-10
# ... and an element whose value is itself rounding noise (k_proj.bias: softmax ignores a shift shared
# by all keys, so its gradient is 0 up to rounding) is compared in absolute terms: a step moves weights
# by ~lr = 1e-3, nine orders of magnitude more
ATOL = 1e-12

MODELS = {
    # every pipeline layout below splits these into at least pp × virtual_stages = 4 stages
    "gpt": ["model=gpt-tiny", "model.n_layer=4"],
    "pangu": ["model=pangu-tiny", "model.n_layer=5"],
    # RMSNorm, rotary positions, grouped-query attention (2 key/value heads for 4 query heads), SwiGLU,
    # an untied output projection
    "llama": ["model=llama-tiny", "model.n_layer=4"],
    # fixed positions: a parameterless module whose rows sequence parallelism splits
    "gpt_sinusoidal": ["model=gpt-tiny", "model.n_layer=4", "model.positions=sinusoidal"],
    # T5's relative position bias: a table per attention layer, split by heads over tp
    "gpt_relative": ["model=gpt-tiny", "model.n_layer=4", "model.positions=relative"],
    # sparse: an MoE layer in every block (switch) / every other block (top-2 without random routing)
    "switch": ["model=switch-tiny", "model.n_layer=4"],
    "glam": ["model=glam-tiny", "model.moe.random_routing=false"],
    # an encoder: masked-LM + next-sentence prediction on sentences (tiny_sentence_data)
    "bert": ["model=bert-tiny", "model.n_layer=4"],
    # ... fine-tuned for classification (tiny_labelled_data), usually from a "bert" run (train.init_from)
    "bert-cls": ["model=bert-tiny", "model.n_layer=4", "train.task=classification"],
    # a vision encoder on scikit-learn's digits (tiny_image_data): 16 patches + [CLS]
    "vit": ["model=vit-tiny", "model.block_size=17"],
    # encoder-decoders on source/target pairs (tiny_pair_data): Vaswani's (post-LN, sinusoidal positions,
    # label smoothing 0.1), T5's (pre-RMSNorm, relative position bias), and T5 with Switch's MoE layers
    "encdec": ["model=transformer-tiny"],
    "t5": ["model=t5-tiny"],
    "encdec-switch": ["model=encdec-switch-tiny"],
}
# train.eval_batches=2: the validation loss is compared over 2 batches (512 tokens), enough to exercise
# each layout's evaluation path; the default 10 made evaluation a third of every case's time
COMMON = ["model.block_size=32", "train.batch_size=8", "train.warmup_steps=2", "train.steps=10",
          "train.progress=none", "train.device=cpu", "train.grad_clip=0.5", "train.lr=1e-3", "train.precision=fp64",
          "train.eval_batches=2"]


def tiny_data(vocab: int = 512, n: int = 20_000, seed: int = 0) -> SimpleNamespace:
    """Tokens from a noisy rule (the next id is 5·id+3 mod vocab nine times in ten), so that a few
    steps visibly lower the loss; no corpus or tokenizer is needed."""
    rng = np.random.default_rng(seed)
    tokens = np.empty(n + n // 4, dtype=np.int64)
    tokens[0] = 1
    noise = rng.integers(0, vocab, len(tokens))
    keep = rng.random(len(tokens)) < 0.9
    for i in range(1, len(tokens)):
        tokens[i] = (5 * tokens[i - 1] + 3) % vocab if keep[i] else noise[i]
    tokens = tokens.astype(np.uint16)
    return SimpleNamespace(train=tokens[:n], val=tokens[n:], meta={})


def tiny_sentence_data(vocab: int = 512, docs: int = 300, seed: int = 0) -> SimpleNamespace:
    """Documents of sentences (3-12 tokens from :func:`tiny_data`'s rule), each sentence ended by [NL]
    and each document by end-of-text, as a WordPiece corpus lays them out for masked-LM; ids 0-6 are
    the special tokens."""
    from loom.data.tokenizer import WORDPIECE_SPECIALS

    special = {t: i for i, t in enumerate(WORDPIECE_SPECIALS)}
    rng = np.random.default_rng(seed)
    stream, out, first = tiny_data(vocab - len(special), 40_000, seed).train.astype(np.int64) + len(special), [], 0
    for _ in range(docs):
        for _ in range(rng.integers(2, 10)):
            n = int(rng.integers(3, 13))
            out += [*stream[first:first + n], special["[NL]"]]
            first += n
        out.append(special["<|endoftext|>"])
    tokens = np.array(out, dtype=np.uint16)
    cut = np.flatnonzero(tokens == special["<|endoftext|>"])[docs * 4 // 5] + 1
    tokenizer = SimpleNamespace(special_ids=special, vocab_size=vocab, kind="wordpiece")
    return SimpleNamespace(train=tokens[:cut], val=tokens[cut:], meta={}, tokenizer=tokenizer)


def tiny_labelled_data(n: int = 400, seed: int = 0) -> SimpleNamespace:
    """:func:`tiny_sentence_data`'s vocabulary and sentences as (token ids, label) examples: three
    labels, each sentence's by its first token, so that it can be learnt."""
    data = tiny_sentence_data(seed=seed)
    rng = np.random.default_rng(seed)
    stream = data.train[data.train > 6].astype(np.int64)
    starts = rng.integers(0, len(stream) - 20, size=n)
    examples = [(stream[s:s + int(rng.integers(5, 20))].tolist(), f"label{stream[s] % 3}") for s in starts]
    return SimpleNamespace(examples=examples, tokenizer=data.tokenizer, meta={}, train=data.train, val=data.val)


def tiny_pair_data(vocab: int = 512, n: int = 300, seed: int = 0) -> SimpleNamespace:
    """(source, target) pairs of token ids for seq2seq: sources of 3-20 tokens from :func:`tiny_data`'s
    rule, each target its first half reversed, so that rows hold different numbers of target
    tokens; ids 0-6 are WordPiece's special tokens."""
    from loom.data.tokenizer import WORDPIECE_SPECIALS

    special = {t: i for i, t in enumerate(WORDPIECE_SPECIALS)}
    rng = np.random.default_rng(seed)
    stream = tiny_data(vocab - len(special), 10_000, seed).train.astype(np.int64) + len(special)
    starts, lengths = rng.integers(0, len(stream) - 20, size=n), rng.integers(3, 21, size=n)
    pairs = [(stream[s:s + k].tolist(), stream[s:s + k][: (k + 1) // 2][::-1].tolist())
             for s, k in zip(starts, lengths)]
    tokenizer = SimpleNamespace(special_ids=special, vocab_size=vocab, kind="wordpiece")
    return SimpleNamespace(pairs=pairs, tokenizer=tokenizer, meta={})


def tiny_image_data() -> SimpleNamespace:
    """scikit-learn's 8×8 handwritten digits (they ship inside the package)."""
    from loom.tasks.image_classification import digits

    return SimpleNamespace(images=digits(), meta={})


def config(model: str, layout: list[str]):
    return load_config(None, [*COMMON, *MODELS[model], *(o for o in layout if not o.startswith("sabotage:"))])


def trainer(model: str, layout: list[str], process: Process, run_dir=None, resume: bool = False) -> Trainer:
    """The trainer of ``model`` under ``layout`` on this rank, its plan resolved and checked as ``loom
    train`` does it."""
    from pathlib import Path

    cfg = config(model, layout)
    plan = resolve_plan(cfg, process.world_size)
    check_plan(plan, cfg, process.world_size)
    data = {"bert": tiny_sentence_data, "bert-cls": tiny_labelled_data, "vit": tiny_image_data,
            "encdec": tiny_pair_data, "t5": tiny_pair_data, "encdec-switch": tiny_pair_data}.get(model, tiny_data)()
    return Trainer(cfg, plan, Path(run_dir) if run_dir is not None else None, data, resume=resume,
                   process=process, device=torch.device("cpu"))


def full_parameters(t: Trainer) -> dict[str, torch.Tensor]:
    """Every parameter this rank holds, whole (DTensors gathered), on the CPU."""
    out = {}
    for name, p in t.model.named_parameters():
        p = p.detach()
        out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).cpu().clone()
    return out


def _train(model: str, layout: list[str], process: Process, steps: int = STEPS) -> dict:
    with _sabotaged([o.split(":", 1)[1] for o in layout if o.startswith("sabotage:")]):
        return _train_as_configured(model, layout, process, steps)


def _train_as_configured(model: str, layout: list[str], process: Process, steps: int) -> dict:
    t = trainer(model, layout, process)
    losses, moe = [], []
    for step in range(steps):
        parts, _ = t.train_step(step)
        losses.append(t.mean_over_replicas(parts).item())
        if t.interval.moe is not None:  # this step's MoE statistics, summed over ranks
            moe.append(all_reduce_sum(t.interval.moe).cpu())
            t.interval.moe = None
    val = (t.evaluate()["val_loss"] if model in ("gpt", "switch", "llama", "bert", "bert-cls", "vit", "encdec", "t5",
                                                 "encdec-switch") else None)
    return {"losses": losses, "params": full_parameters(t), "val_loss": val, "moe": moe}


def assert_matches(got: dict, ref: dict) -> None:
    """``got`` (a layout's result) equals ``ref`` (one process's) to float64 rounding: every step's
    loss and the validation loss within :data:`RTOL`, every parameter element within
    ``ATOL + RTOL·|ref|``. Raises AssertionError naming what differs, and by how much."""
    _same_steps_and_names(got, ref)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=RTOL, atol=0,
                               msg=lambda m: f"losses per step differ: {m}")
    for name, p in ref["params"].items():
        q = got["params"][name]
        assert q.dtype == p.dtype, f"{name}: {q.dtype} under the layout, {p.dtype} on one process"
        rel = ((q - p).norm() / p.norm().clamp_min(1e-300)).item()
        torch.testing.assert_close(q, p, rtol=RTOL, atol=ATOL,
                                   msg=lambda m, n=name, r=rel: f"{n} after the steps (norm-relative {r:.1e}): {m}")
    if ref["val_loss"] is not None:
        assert abs(got["val_loss"] - ref["val_loss"]) <= RTOL * abs(ref["val_loss"]), \
            f"validation loss {got['val_loss']!r} != {ref['val_loss']!r}"


def assert_matches_roughly(got: dict, ref: dict, loss_rtol: float, matrix_rtol: float | None) -> None:
    """The production precisions' check: every step's loss within ``loss_rtol``, every weight matrix
    within ``matrix_rtol`` of its norm (None: weights not compared). Biases and norms are left to the
    float64 suite: they start at 0 or 1, and Adam turns the rounding noise of a ~0 gradient into
    full-size steps."""
    _same_steps_and_names(got, ref)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=loss_rtol, atol=0,
                               msg=lambda m: f"losses per step differ: {m}")
    for name, p in ref["params"].items():
        if p.dim() >= 2 and matrix_rtol is not None:
            rel = ((got["params"][name] - p).norm() / p.norm()).item()
            assert rel <= matrix_rtol, f"{name}: norm-relative difference {rel:.2e} > {matrix_rtol:g}"


def _same_steps_and_names(got: dict, ref: dict) -> None:
    assert len(got["losses"]) == len(ref["losses"]), "a layout ran a different number of steps"
    assert sorted(got["params"]) == sorted(ref["params"]), "a layout lost or renamed parameters"


def train_single(model: str, layout: list[str] | None = None, steps: int = STEPS) -> dict:
    return _train(model, layout or [], Process(), steps)


def train_layouts(cases: list[tuple[str, list[str]]]) -> dict:
    """On every rank: ``{(model, layout...): result}`` for each case."""
    import torch.distributed as dist

    process = Process(dist.get_rank(), dist.get_world_size(), dist.get_rank())
    return {(model, *layout): _train(model, layout, process) for model, layout in cases}


def merge_ranks(results: list[dict], key) -> dict:
    """One case's result with the parameters of all ranks (pipeline stages) merged."""
    params: dict[str, torch.Tensor] = {}
    for r in results:
        params.update(r[key]["params"])
    return {**results[0][key], "params": params}


def process_of_this_rank() -> Process:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Process(dist.get_rank(), dist.get_world_size(), dist.get_rank())
    return Process()


def train_and_save(model: str, layout: list[str], run_dir: str, steps: int) -> list[float]:
    """Train ``steps`` steps under ``layout`` and save a checkpoint in ``run_dir``."""
    from pathlib import Path

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    t = trainer(model, layout, process_of_this_rank(), run_dir)
    losses = [t.mean_over_replicas(t.train_step(s)[0]).item() for s in range(steps)]
    t.save(steps)
    t.metrics.close() if t.metrics else None
    return losses


def resume_and_train(model: str, layout: list[str], run_dir: str, steps: int) -> list[float]:
    """Resume ``run_dir``'s newest checkpoint under ``layout`` and train up to ``steps`` steps."""
    t = trainer(model, layout, process_of_this_rank(), run_dir, resume=True)
    losses = [t.mean_over_replicas(t.train_step(s)[0]).item() for s in range(t.start_step, steps)]
    t.metrics.close() if t.metrics else None
    return losses


# ------------------------------------------------------------------------------------------
# Layouts broken on purpose: the parity check must fail on each
# ------------------------------------------------------------------------------------------


def _bias_on_every_rank():
    """Tensor parallelism that adds a row-split projection's bias on every tp rank before the
    partial sums are reduced (so the sum holds tp copies of it): the classic Megatron-LM slip."""
    from loom.parallel import tensor

    original = tensor.apply_tensor_parallel

    def broken(model, tp_mesh, strategies, sequence_parallel, sharding):
        original(model, tp_mesh, strategies, sequence_parallel, sharding)
        extra = tp_mesh.size() - 1
        for name, mod in model.named_modules():
            if strategies.get(name) == "rowwise" and getattr(mod, "bias", None) is not None:
                mod.register_forward_hook(lambda m, args, out: out + extra * m.bias.to_local())

    return _patched(tensor, "apply_tensor_parallel", broken)


def _dropped_microbatch():
    """A pipeline that leaves the first micro-batch of every step out of the gradient (its loss is
    still computed and reported, so only the parameters can tell)."""
    from loom.parallel import pipeline

    original_step, original_loss = pipeline.Pipeline.step, pipeline._scaled_loss
    seen = {"count": 0}

    def step(self, x, y):
        seen["count"] = 0
        return original_step(self, x, y)

    def scaled_loss(output, target, *, loss_fn, n):
        seen["count"] += 1
        loss = original_loss(output, target, loss_fn=loss_fn, n=n)
        return loss * 0 if seen["count"] == 1 else loss

    stack = contextlib.ExitStack()
    stack.enter_context(_patched(pipeline.Pipeline, "step", step))
    stack.enter_context(_patched(pipeline, "_scaled_loss", scaled_loss))
    return stack


@contextlib.contextmanager
def _patched(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _local_mlm_normalization():
    """Masked-LM normalized by each micro-batch's own count of predicted tokens instead of the global
    batch's: equal to one process only when every rank happens to predict as many tokens."""
    from loom.tasks import masked_lm

    original = masked_lm.mlm_nsp_loss

    def local(outputs, targets):
        labels, nsp, weight = targets
        own = (labels != masked_lm.IGNORE).sum(1).to(weight.dtype)  # per row: the sum is this slice's count
        return original(outputs, (labels, nsp, own))

    return _patched(masked_lm, "mlm_nsp_loss", local)


def _local_target_normalization():
    """The seq2seq loss normalized by each micro-batch's own count of target tokens instead of the
    global batch's."""
    from loom.tasks import seq2seq

    original = seq2seq.seq2seq_loss

    def local(logits, targets, label_smoothing=0.0):
        labels, weight = targets
        own = (labels != seq2seq.IGNORE).sum(1).to(weight.dtype)
        return original(logits, (labels, own), label_smoothing)

    return _patched(seq2seq, "seq2seq_loss", local)


SABOTAGE = {"bias_on_every_rank": _bias_on_every_rank, "dropped_microbatch": _dropped_microbatch,
            "local_mlm_normalization": _local_mlm_normalization,
            "local_target_normalization": _local_target_normalization}


@contextlib.contextmanager
def _sabotaged(names: list[str]):
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(SABOTAGE[name]())
        yield
