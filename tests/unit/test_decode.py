"""Greedy and beam search for encoder-decoder models, against stand-in models whose every
next-token distribution is known (a function of the source and the whole target prefix)."""

import itertools
import math

import pytest
import torch

from loom.infer.decode import beam_search, decode, greedy_decode, length_penalty

PAD, EOS, BOS = -1, 0, 1


class PrefixCache:
    """What a real cache keeps, in the stand-in's terms: each row's source (set once, as
    cross-attention keys/values are) and its target prefix so far (as self-attention keys/values)."""

    def __init__(self, reorders: bool = True):
        self.src, self.prefix, self.cross_computed, self.reorders = None, None, 0, reorders

    def reorder(self, index: torch.Tensor) -> None:
        if self.reorders:  # a cache that forgets to follow its beams: the sabotage case
            self.src = [self.src[i] for i in index.tolist()]
            self.prefix = [self.prefix[i] for i in index.tolist()]


class StandIn(torch.nn.Module):
    """An encoder-decoder whose logits after target prefix ``p`` for source ``s`` are ``fn(s, p)``."""

    def __init__(self, fn, reorders: bool = True):
        super().__init__()
        self.fn, self.reorders, self.encodes, self.caches = fn, reorders, 0, []

    def encode(self, src_ids, src_mask=None):
        self.encodes += 1
        return src_ids[..., None].float(), src_ids != PAD if src_mask is None else src_mask  # (B, S, 1), (B, S)

    def new_cache(self, batch, max_tgt_len):
        self.caches.append(PrefixCache(self.reorders))
        return self.caches[-1]

    def decode(self, tgt_ids, memory, src_pad_mask, cache=None):
        srcs = [tuple(int(x) for x, keep in zip(m[:, 0], k) if keep) for m, k in zip(memory, src_pad_mask)]
        prefixes = [()] * len(srcs)
        if cache is not None:
            if cache.src is None:
                cache.src, cache.prefix, cache.cross_computed = srcs, prefixes, cache.cross_computed + 1
            srcs, prefixes = cache.src, cache.prefix
        out, grown = [], []
        for s, p, row in zip(srcs, prefixes, tgt_ids.tolist()):
            logits = []
            for tok in row:
                p = (*p, tok)
                logits.append(self.fn(s, p))
            out.append(torch.stack(logits))
            grown.append(p)
        if cache is not None:
            cache.prefix = grown
        return torch.stack(out)  # (B, T, V)


def hashed(vocab: int, seed: int = 0, scale: float = 2.5):
    """Every (source, prefix) its own random distribution over ``vocab`` ids."""
    table = torch.randn(4099, vocab, generator=torch.Generator().manual_seed(seed)) * scale
    return lambda s, p: table[hash((s, p)) % 4099]


def sources(rows):
    width = max(map(len, rows))
    return torch.tensor([r + [PAD] * (width - len(r)) for r in rows])


def logprob(fn, src, tokens, max_len):
    """log P(tokens [+ eos] | src) under the stand-in, and the hypothesis' length."""
    total, p = 0.0, (BOS,)
    ended = tokens + ([EOS] if len(tokens) < max_len else [])
    for tok in ended:
        total += float(torch.log_softmax(fn(tuple(src), p), -1)[tok])
        p = (*p, tok)
    return total, len(ended)


def test_beam_search_finds_the_most_probable_target_that_greedy_misses():
    a, b, c = 2, 3, 4
    probs = {(BOS,): {a: 0.5, b: 0.4, c: 0.1}, (BOS, a): {c: 0.35, b: 0.3, EOS: 0.25, a: 0.1},
             (BOS, b): {EOS: 0.9, a: 0.1}}  # every other prefix: eos

    def fn(s, p):
        table = probs.get(p, {EOS: 1.0})
        return torch.tensor([math.log(table.get(i, 1e-9)) for i in range(5)])

    model, src = StandIn(fn), sources([[7, 8]])
    assert greedy_decode(model, src, BOS, EOS, max_len=4) == [[a, c]]  # 0.5 × 0.35 × 1 = 0.175
    best = beam_search(model, src, BOS, EOS, max_len=4, beam=2, alpha=0.0)[0][0]
    assert best.tokens == [b] and best.logprob == pytest.approx(math.log(0.36))


@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.5])
def test_a_wide_enough_beam_equals_exhaustive_search(alpha):
    # vocabulary {eos, 1, 2}, at most 4 tokens: 2³ × 3 = 24 candidates at the last step, all within 2 × 12
    fn, max_len = hashed(3, seed=1), 4
    srcs = [[5, 6, 7], [9], [4, 4]]
    found = beam_search(StandIn(fn), sources(srcs), BOS, EOS, max_len, beam=12, alpha=alpha, n_best=5)
    for src, hyps in zip(srcs, found):
        every = []
        for n in range(max_len + 1):
            for toks in itertools.product([1, 2], repeat=n):
                lp, length = logprob(fn, src, list(toks), max_len)
                every.append((lp / length_penalty(length, alpha), list(toks), lp))
        every.sort(key=lambda e: -e[0])
        assert [h.tokens for h in hyps] == [e[1] for e in every[:5]]
        assert [h.score for h in hyps] == pytest.approx([e[0] for e in every[:5]], abs=1e-5)
        assert [h.logprob for h in hyps] == pytest.approx([e[2] for e in every[:5]], abs=1e-5)


def test_beam_of_one_equals_greedy():
    model, src = StandIn(hashed(6, seed=2)), sources([[3, 4, 5], [6], [2, 2, 2, 2], [7, 1]])
    greedy = greedy_decode(model, src, BOS, EOS, max_len=7)
    assert [h[0].tokens for h in beam_search(model, src, BOS, EOS, 7, beam=1, alpha=0.0)] == greedy
    assert decode(model, src, BOS, EOS, 7, beam=1) == greedy
    assert {len(g) for g in greedy} != {7} and any(len(g) < 7 for g in greedy)  # some rows ended early


@pytest.mark.parametrize("beam", [1, 3])
def test_cached_decoding_equals_recomputation_and_encodes_once(beam):
    src = sources([[3, 4, 5], [6], [2, 2, 2, 2], [7, 1], [8, 9]])
    cached, fresh = StandIn(hashed(8, seed=3)), StandIn(hashed(8, seed=3))
    a = beam_search(cached, src, BOS, EOS, 9, beam=beam, n_best=beam, use_cache=True)
    b = beam_search(fresh, src, BOS, EOS, 9, beam=beam, n_best=beam, use_cache=False)
    assert a == b
    assert cached.encodes == 1 and [c.cross_computed for c in cached.caches] == [1]
    fresh_greedy = greedy_decode(fresh, src, BOS, EOS, 9, src_mask=src != PAD, use_cache=False)
    assert greedy_decode(cached, src, BOS, EOS, 9) == fresh_greedy


def test_a_cache_that_does_not_follow_its_beams_is_caught():
    src = sources([[3, 4, 5], [6], [2, 2, 2, 2], [7, 1]])
    right = beam_search(StandIn(hashed(8, seed=3)), src, BOS, EOS, 9, beam=3, use_cache=False)
    wrong = beam_search(StandIn(hashed(8, seed=3), reorders=False), src, BOS, EOS, 9, beam=3)
    assert right != wrong


def test_padded_vocabulary_ids_are_never_chosen():
    def fn(s, p):  # ids 4 and 5 (padding rows of the output layer) would win every step
        return torch.tensor([-3.0, 1.0, 2.0, 1.5, 9.0, 9.0])

    model, src = StandIn(fn), sources([[3], [4, 5]])
    for beam in (1, 3):
        out = decode(model, src, BOS, EOS, 5, beam=beam, vocab_size=4)
        assert all(t < 4 for row in out for t in row) and out == [[2] * 5] * 2


def test_bad_settings_are_refused():
    model, src = StandIn(hashed(4)), sources([[3]])
    for kwargs in ({"max_len": 0}, {"max_len": 3, "beam": 0}, {"max_len": 3, "beam": 2, "n_best": 3},
                   {"max_len": 3, "alpha": -0.1}):
        with pytest.raises(ValueError):
            beam_search(model, src, BOS, EOS, **kwargs)
