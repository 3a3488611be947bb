"""BLEU, exact match and the two baselines of a sequence-to-sequence evaluation."""

import pytest

from loom.infer.seq2seq import baselines, bleu_signature, most_common, text_scores


def test_perfect_and_disjoint_predictions():
    refs = ["Return the absolute value of x.", "Open a file and return a stream."]
    assert text_scores(refs, refs) == {"bleu": 100.0, "exact_match": 100.0}
    assert text_scores(["zzz qqq", "yyy www"], refs) == {"bleu": 0.0, "exact_match": 0.0}


def test_partial_overlap_scores_between_the_extremes():
    refs = ["Return the absolute value of the number x.", "Open a file and return a stream."]
    hyps = ["Return the absolute value of the integer x.", "Open a file and return a stream."]
    s = text_scores(hyps, refs)
    assert 0 < s["bleu"] < 100 and s["exact_match"] == 50.0


def test_exact_match_ignores_runs_of_whitespace_only():
    assert text_scores(["  Return  x. "], ["Return x."])["exact_match"] == 100.0
    assert text_scores(["return x."], ["Return x."])["exact_match"] == 0.0


def test_baselines_copy_the_source_and_predict_the_most_common_target():
    train = ["Return x.", "Close it.", "Return x.", "Close it.", "Open it."]
    assert most_common(train) == "Return x."  # tied with "Close it.": the first seen wins
    b = baselines(sources=["def f(): return x", "Close it."], references=["Return x.", "Close it."],
                  train_targets=train)
    assert b["copy_source"]["exact_match"] == 50.0
    assert b["most_common_target"] == {"bleu": pytest.approx(b["most_common_target"]["bleu"]), "exact_match": 50.0,
                                       "target": "Return x."}


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        text_scores(["a"], ["a", "b"])


def test_the_signature_says_how_bleu_was_computed():
    assert "tok:13a" in bleu_signature()
