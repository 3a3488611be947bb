"""BERT and its pretraining task: the padding mask, the published shapes, masked-LM's masking
statistics, next-sentence labels, and a loss normalized by the global count of predicted tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loom.config import load_config
from loom.models import build_model, count_params, materialize
from loom.tasks import build_task
from loom.tasks.masked_lm import IGNORE, SentenceCorpus, mask_tokens
from tests.distributed.parity import tiny_sentence_data


def _bert(*overrides: str):
    cfg = load_config(None, ["model=bert-tiny", *overrides]).model
    return materialize(build_model(cfg).double(), "cpu", seed=0).eval()


@pytest.mark.parametrize("post_ln", ["true", "false"])
def test_padding_is_invisible_to_real_positions(post_ln):
    model = _bert(f"model.post_ln={post_ln}")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(7, 512, (3, 12), generator=g)
    types = (torch.arange(12) >= 6).long().expand(3, 12)
    mlm, nsp = model(ids, types, torch.ones_like(ids))
    pad = torch.zeros(3, 9, dtype=torch.long)
    # padding of arbitrary ids: only the mask tells the model to ignore them
    mlm_p, nsp_p = model(torch.cat([ids, pad + 9], 1), torch.cat([types, pad], 1),
                         torch.cat([torch.ones_like(ids), pad], 1))
    torch.testing.assert_close(mlm_p[:, :12], mlm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(nsp_p, nsp, rtol=1e-12, atol=1e-12)
    # and the test can fail: without the mask the padding changes every output
    mlm_u, _ = model(torch.cat([ids, pad + 9], 1), torch.cat([types, pad], 1))
    assert (mlm_u[:, :12] - mlm).abs().max() > 1e-3


def test_published_shapes_and_counts():
    # every distinct parameter of the pretraining model, the decoder tied to the token embedding
    counts = {p: count_params(build_model(load_config(None, [f"model={p}"]).model))
              for p in ("bert-base", "bert-large")}
    assert counts == {"bert-base": 110_106_428, "bert-large": 336_226_108}
    classifier = load_config(None, ["model=bert-base", "model.n_classes=3"]).model
    # the encoder and pooler as released (109,482,240) plus a 3-way classifier
    assert count_params(build_model(classifier)) == 109_482_240 + 768 * 3 + 3


def test_masking_chooses_15_percent_and_replaces_80_10_10():
    rng = np.random.default_rng(0)
    chosen = masked = swapped = kept = total = 0
    for _ in range(2000):
        ids = rng.integers(7, 500, size=43)
        candidates = np.arange(1, 41)  # [CLS] at 0 and two [SEP]s are never chosen
        new, labels = mask_tokens(ids, candidates, rng, mask_id=4, first_normal=7, vocab=500)
        sel = labels != IGNORE
        assert not sel[[0, 41, 42]].any() and (labels[sel] == ids[sel]).all()
        assert (new[~sel] == ids[~sel]).all()  # what is not chosen is left alone
        chosen += sel.sum()
        total += len(candidates)
        masked += (new[sel] == 4).sum()
        kept += (new[sel] == ids[sel]).sum()
        swapped += ((new[sel] != 4) & (new[sel] != ids[sel])).sum()
    assert chosen / total == 0.15  # round(0.15 × 40) = 6 per sequence
    assert mask_tokens(ids[:5], np.arange(1, 4), rng, 4, 7, 500)[1].tolist().count(IGNORE) == 4  # at least one
    # a random replacement may draw the original id (1 in 493): counted as kept
    assert masked / chosen == pytest.approx(0.8, abs=0.01)
    assert swapped / chosen == pytest.approx(0.1, abs=0.01)
    assert kept / chosen == pytest.approx(0.1, abs=0.01)


def _task(batch: int = 8):
    return build_task("masked_lm", tiny_sentence_data(), 32, batch, seed=1)


def test_pairs_are_laid_out_as_bert_reads_them_and_nsp_is_balanced():
    task = _task(batch=64)
    labels = []
    for step in range(20):
        b = task.train_batch(step, slice(0, 64))
        labels.append(b["nsp_labels"])
        for r in range(8):
            n = int(b["attention_mask"][r].sum())
            ids, types = b["input_ids"][r], b["token_type_ids"][r]
            seps = (ids[:n] == 3).nonzero().flatten().tolist()
            assert ids[0] == 2 and seps[-1] == n - 1 and len(seps) == 2 and (ids[n:] == 0).all()
            assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1 : n] == 1).all() and (types[n:] == 0).all()
        assert torch.equal(task.train_batch(step, slice(2, 6))["input_ids"], b["input_ids"][2:6])  # rows of the step
    labels = torch.cat(labels).double()
    assert labels.mean().item() == pytest.approx(0.5, abs=0.05)  # 1280 draws: 3.5 standard deviations
    # an IsNext pair's B starts with the sentence that follows A's last one in the same document: in
    # this corpus every token of sentence k is 7 + k, so a token tells its sentence
    tokens = []
    for doc in range(60):
        for k in range(doc * 5, doc * 5 + 5):
            tokens += [7 + k] * (3 + k % 7) + [6]
        tokens.append(5)
    corpus = SentenceCorpus(np.array(tokens), (6, 5), 5)
    rng, seen = np.random.default_rng(5), 0
    for _ in range(300):
        a, b, label = task.pair(corpus, rng)
        if label == 0:
            last, first = a[-1] - 7, b[0] - 7
            assert first == last + 1 and first // 5 == last // 5, (last, first)
            seen += 1
    assert 100 < seen < 200


def test_masked_lm_loss_is_normalized_by_the_global_count():
    """Equal-row pieces of a batch (replicas, micro-batches) each predicting a different number of
    tokens: the mean of their losses is the whole batch's loss, and so are the gradients."""
    task, model = _task(), _bert()
    batch = task.train_batch(0, slice(0, 8))
    counts = [(batch["labels"][i : i + 2] != IGNORE).sum().item() for i in range(0, 8, 2)]
    assert len(set(counts)) > 1  # the pieces do differ

    def loss(rows):
        part = {k: v[rows] for k, v in batch.items()}
        return task.loss(model(*task.inputs(part)), task.targets(part))

    whole = loss(slice(0, 8))
    pieces = torch.stack([loss(slice(i, i + 2)) for i in range(0, 8, 2)]).mean()
    assert pieces.item() == pytest.approx(whole.item(), rel=1e-12)
    assert task.units(batch) == sum(counts)


def test_describe_and_plan_read_bert_from_its_spec(loom_cli):
    code, out, _ = loom_cli("describe", "bert-large")
    assert code == 0 and "336,226,108" in out and "(-1.11%)" in out and "bert: 24 layers" in out
    code, out, err = loom_cli("plan", "bert-large", "--cluster", "64xa100-80g", "--global-batch", "1024",
                              "--fix", "dp=32,tp=2,pp=1")
    assert code == 0, err
    assert "model=bert-large" in out and "dp=32 tp=2 pp=1" in out
