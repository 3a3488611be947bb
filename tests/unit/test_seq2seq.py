"""The seq2seq task: the built-in code -> docstring pairs, teacher-forced batches, a loss normalized
by the global count of target tokens, label smoothing only where gradients are taken."""

from __future__ import annotations

import json

import pytest
import torch

from loom.config import ConfigError, load_config
from loom.tasks.seq2seq import IGNORE, Seq2Seq, function_pairs, read_pairs, seq2seq_loss
from tests.distributed.parity import tiny_pair_data

MODULE = '''
@cache
def area(r):
    """Return the area of a circle of radius r.

    More text that is not the first sentence.
    """
    return 3.14159 * r * r


def undocumented(x):
    return x


def only_a_docstring():
    """Does nothing at all, really."""
'''


def test_function_pairs_strip_the_docstring_and_keep_its_first_sentence_the_signature_first():
    assert function_pairs(MODULE) == [("def area(r):\n@cache\n    return 3.14159 * r * r",
                                       "Return the area of a circle of radius r.")]


def _task(batch_size: int = 8) -> Seq2Seq:
    data = tiny_pair_data()
    return Seq2Seq.from_data(data, 32, batch_size, seed=0)


def test_batches_are_teacher_forced_and_padded():
    task = _task()
    b = task.train_batch(0, slice(0, 8))
    src, mask, tgt_in, labels = b["src_ids"], b["src_mask"], b["tgt_in"], b["labels"]
    assert src.shape == (8, 32) and tgt_in.shape == labels.shape == (8, task.target_len)
    for r in range(8):
        n_src, n_tgt = int(mask[r].sum()), int((labels[r] != IGNORE).sum())
        assert src[r, n_src - 1] == task.eos_id and (src[r, n_src:] == task.pad_id).all()
        assert tgt_in[r, 0] == task.bos_id and labels[r, n_tgt - 1] == task.eos_id
        assert torch.equal(tgt_in[r, 1:n_tgt], labels[r, :n_tgt - 1])  # the decoder reads the target shifted right
    assert b["tgt_weight"].sum() == (labels != IGNORE).sum()


def test_the_loss_of_slices_sums_to_the_loss_of_the_batch_and_smoothing_needs_gradients():
    task = _task()
    task.label_smoothing = 0.1
    b = task.train_batch(3, slice(0, 8))
    logits = torch.randn(8, task.target_len, 512, dtype=torch.float64, requires_grad=True)
    whole = task.loss(logits, task.targets(b))
    halves = sum(task.loss(logits[s], task.targets({k: v[s] for k, v in b.items()})) / 2
                 for s in (slice(0, 4), slice(4, 8)))
    torch.testing.assert_close(halves * 2 / 2, whole)  # each half over the global count: their sum is the whole
    with torch.no_grad():
        plain = seq2seq_loss(logits, task.targets(b), 0.1)
    labels = b["labels"]
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    torch.testing.assert_close(plain, expected)
    assert abs(whole.item() - plain.item()) > 1e-3  # smoothed while training


def test_label_smoothing_is_the_published_one_unless_set():
    task = _task()
    task.configure(load_config(None, ["model=transformer-tiny"]))
    assert task.label_smoothing == 0.1
    task.configure(load_config(None, ["model=t5-tiny"]))
    assert task.label_smoothing == 0.0
    task.configure(load_config(None, ["model=t5-tiny", "train.label_smoothing=0.2"]))
    assert task.label_smoothing == 0.2
    with pytest.raises(ConfigError, match="train.label_smoothing"):
        load_config(None, ["model=t5-tiny", "train.label_smoothing=1.5"])


def test_user_pairs_are_read_and_bad_records_refused(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text(json.dumps({"source": "a b", "target": "c"}) + "\n\n")
    assert read_pairs(str(f)) == [("a b", "c")]
    f.write_text(json.dumps({"source": "a b"}) + "\n")
    with pytest.raises(ConfigError, match="source and target"):
        read_pairs(str(f))


def test_label_smoothing_is_torchs_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[1, 3:] = IGNORE
    weight = torch.full((2,), float((labels != IGNORE).sum()) / 2, dtype=torch.float64)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                             label_smoothing=0.1)
    got = seq2seq_loss(logits, (labels, weight), 0.1)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    (want_grad,), (got_grad,) = torch.autograd.grad(want, logits), torch.autograd.grad(got, logits)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-15)


def test_label_smoothing_under_tensor_parallelism_is_accepted():
    """Exact on vocabulary-split logits (tests/distributed/test_encdec_parity.py proves it)."""
    load_config(None, ["model=transformer-tiny", "parallel.tp=2"])


def test_the_data_is_the_pairs_and_the_tokenizer_learns_from_both_sides(tmp_path):
    """Only the pairs are encoded (one document each), and a character found only in targets has
    its own token rather than [UNK]."""
    from loom.tasks import build_task
    from loom.train.rundir import prepare_run_data

    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"source": f"def f{i}(x):\n    return x * {i}", "target": f"Ω times {i}."}) + "\n"
                         for i in range(30)))
    cfg = load_config(None, ["model=transformer-tiny", f"data.path={f}", "model.vocab_size=300",
                             f"data.cache_dir={tmp_path / 'cache'}"])
    data = prepare_run_data(cfg)
    assert data.meta["n_documents"] == 30
    task = build_task("seq2seq", data, 32, 8, 0)
    unk = data.tokenizer.encode("\u2603")[0]  # a snowman: in neither side
    assert unk not in task.train[3] and unk not in task.val[3]
    assert "Ω" in data.tokenizer.decode(task.train[3][0][task.train[3][0] >= 0].tolist())
