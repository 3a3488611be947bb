"""Fine-tuning: LoRA adapters train alone (the rest unchanged, the optimizer holding only them) and merge
into the weights without changing the model; train.freeze keeps parameters as they were; the SFT task
learns responses only."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from loom.config import ConfigError, load_config
from loom.infer.generate import generate
from loom.models import build_model
from loom.models.lora import LoRALinear, is_lora_param, merge_lora
from loom.parallel.launch import Process
from loom.parallel.plan import resolve_plan
from loom.tasks.sft import IGNORE, SFT, sft_rows
from loom.train.finetune import prepare_for_finetuning
from loom.train.trainer import Trainer
from tests.distributed.parity import tiny_data

TINY = ["model=gpt-tiny", "model.block_size=32", "train.batch_size=4", "train.progress=none", "train.device=cpu",
        "train.lr=1e-2", "train.warmup_steps=0", "train.weight_decay=0"]


def trained(*overrides: str, steps: int = 3) -> tuple[Trainer, dict, dict]:
    """A trainer after ``steps`` steps, with every parameter before and after."""
    cfg = load_config(None, [*TINY, *overrides])
    t = Trainer(cfg, resolve_plan(cfg, 1), None, tiny_data(), process=Process(), device=torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    for step in range(steps):
        t.train_step(step)
    return t, before, {n: p.detach().clone() for n, p in t.model.named_parameters()}


def test_lora_trains_only_the_adapters_and_the_optimizer_holds_only_them():
    t, before, after = trained("train.lora.rank=4", "train.lora.targets=['*.q_proj','*.v_proj','*.mlp.fc']")
    lora = {n for n in after if is_lora_param(n)}
    assert len(lora) == 2 * 3 * 2  # (A, B) × 3 targets × 2 blocks
    for name in after:
        moved = not torch.equal(before[name], after[name])
        assert moved == (name in lora), f"{name} {'moved' if moved else 'did not move'}"
    held = {id(p) for opt in t.optimizers for group in opt.param_groups for p in group["params"]}
    with_state = {id(p) for opt in t.optimizers for p in opt.state}
    adapters = {id(p) for n, p in t.model.named_parameters() if n in lora}
    assert held == adapters and with_state == adapters


def test_a_lora_run_resumes_from_its_checkpoint(tmp_path):
    """Adapters and their optimizer state (matrices only: no empty parameter group) reload."""
    cfg = load_config(None, [*TINY, "train.lora.rank=4", f"train.run_dir={tmp_path}"])

    def make(resume: bool) -> Trainer:
        return Trainer(cfg, resolve_plan(cfg, 1), tmp_path, tiny_data(), resume=resume, process=Process(),
                       device=torch.device("cpu"))

    t = make(False)
    for step in range(2):
        t.train_step(step)
    t.save(2)
    again = make(True)
    assert again.start_step == 2
    for (name, p), (_, q) in zip(t.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(p, q), name


def test_merged_lora_gives_the_unmerged_logits():
    t, _, _ = trained("train.lora.rank=4", "train.precision=fp64")
    model = t.model.modules[0].eval()
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged = model(x)
        assert merge_lora(model) == 4 and not any(isinstance(m, LoRALinear) for m in model.modules())
        merged = model(x)
    assert not any(is_lora_param(n) for n, _ in model.named_parameters())
    torch.testing.assert_close(merged, unmerged, rtol=1e-12, atol=1e-12)
    assert generate(model, x[:, :4], 8, temperature=0).shape == (2, 12)


def test_lora_starts_as_the_model_it_adapts():
    cfg = load_config(None, [*TINY, "train.lora.rank=2"])
    plain = build_model(cfg.model, "cpu")
    plain.init_weights(0)
    adapted = prepare_for_finetuning(build_model(cfg.model, "meta"), cfg.train)
    adapted.to_empty(device="cpu")
    adapted.init_weights(0)  # the adapters' initial_value: B = 0
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        assert torch.equal(plain(x), adapted(x))


def test_freeze_keeps_the_named_parameters_as_they_were():
    _, before, after = trained("train.freeze=[tok_emb.*,'layers.0.*']")
    for name in after:
        frozen = name.startswith(("tok_emb.", "layers.0."))
        assert torch.equal(before[name], after[name]) == frozen, name


@pytest.mark.parametrize("overrides, fragment", [
    (["train.freeze=[nothing.*]"], "names no parameter"),
    (["train.freeze=['*']"], "freezes every parameter"),
    (["train.lora.rank=2", "train.lora.targets=['*.nope']"], "names no linear layer"),
])
def test_finetuning_settings_that_cannot_work_are_one_line(overrides, fragment):
    cfg = load_config(None, [*TINY, *overrides])
    with pytest.raises(ConfigError, match=fragment):
        prepare_for_finetuning(build_model(cfg.model), cfg.train)


def test_an_unquoted_leading_star_is_one_line():
    with pytest.raises(ConfigError, match="quote patterns"):
        load_config(None, ["train.freeze=[*.bias]"])


def test_sft_labels_only_the_response():
    prompt, response = [5, 6, 7], [8, 9, 0]  # 0: end of text
    x, y = sft_rows([(prompt, response)], block_size=8, pad=0)
    assert x[0].tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    # position j predicts token j+1: positions 0 and 1 predict prompt tokens, 2..4 the response
    assert y[0].tolist() == [IGNORE, IGNORE, 8, 9, 0, IGNORE, IGNORE, IGNORE]


def test_sft_loss_ignores_what_the_model_says_about_the_prompt(tmp_path):
    from loom.data.tokenizer import BpeTokenizer

    records = [{"prompt": f"Q{i}: what is {i}+{i}?", "response": f" {2 * i}" + " and so on" * i} for i in range(10)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tok = BpeTokenizer.train(iter([r["prompt"] + r["response"] for r in records]), 300)
    data = SimpleNamespace(tokenizer=tok, meta={"source": str(tmp_path), "val_fraction": 0.1})
    task = SFT.from_data(data, block_size=48, batch_size=4, seed=0)
    batch = task.train_batch(0, slice(None))
    logits = torch.randn(4, 48, tok.vocab_size, dtype=torch.float64)
    loss = task.loss(logits, task.targets(batch))
    scored = batch["labels"] != IGNORE
    assert task.units(batch) == int(scored.sum()) > 0
    noisy = logits.clone()
    noisy[~scored] = torch.randn_like(noisy[~scored])  # what the model says where nothing is learned
    assert torch.equal(task.loss(noisy, task.targets(batch)), loss)
    ref = torch.nn.functional.cross_entropy(logits[scored], batch["labels"][scored])
    torch.testing.assert_close(loss, ref)
    # halves of the batch (two replicas, two micro-batches) average to the whole batch's mean, though
    # they hold different numbers of response tokens
    halves = [task.train_batch(0, rows) for rows in (slice(0, 2), slice(2, 4))]
    counts = [int((h["labels"] != IGNORE).sum()) for h in halves]
    assert counts[0] != counts[1], counts  # a mean per half would weigh their tokens unequally
    parts = [task.loss(logits[r], task.targets(h)) for r, h in zip((slice(0, 2), slice(2, 4)), halves)]
    torch.testing.assert_close((parts[0] + parts[1]) / 2, ref)
