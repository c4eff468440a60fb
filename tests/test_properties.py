"""Property tests (hypothesis) for the pure functions and the pooling."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jina_v4.model.heads import mean_rows
from jina_v4.model.images import smart_resize
from jina_v4.model.positions import rope_index, window_index

from tolerances import SAME, gamma

F = 28


@given(st.integers(1, 20000), st.integers(1, 20000), st.integers(F * F * 200, 4_000_000), st.integers(1, 12))
def test_smart_resize(h, w, max_pixels, min_factor):
    min_pixels = min_factor * F * F  # the released bounds are 4 and 768 factors squared
    if max(h, w) / min(h, w) > 200:
        return  # rejected with an error, tested elsewhere
    rh, rw = smart_resize(h, w, F, min_pixels, max_pixels)
    assert rh % F == 0 and rw % F == 0 and rh >= F and rw >= F
    assert min_pixels <= rh * rw <= max_pixels or (rh * rw > max_pixels and F in (rh, rw))  # a side at the floor
    if F in (rh, rw):
        return  # a side clamped up to one factor: no common scale to keep
    # the aspect is kept: both sides are within one factor of the input scaled by one common factor
    scales = [1.0, (max_pixels / (h * w)) ** 0.5, (min_pixels / (h * w)) ** 0.5]
    assert any(abs(rh - h * s) <= F and abs(rw - w * s) <= F for s in scales)


@given(st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=4), st.integers(1, 6))
def test_window_index_is_a_permutation(grids, window):
    offset, index = 0, []
    for gh, gw in grids:
        idx, lengths = window_index((1, 2 * gh, 2 * gw), window, 2)
        assert sorted(idx.tolist()) == list(range(gh * gw)) and sum(lengths) == gh * gw
        assert all(0 < n <= window * window for n in lengths)
        index.append(idx + offset)
        offset += gh * gw
    perm = torch.cat(index)
    x = torch.randn(len(perm), 3)
    restored = torch.empty_like(x)
    restored[perm] = x[perm]  # what the tower does after the merger
    assert torch.equal(restored, x) and torch.equal(x[perm][torch.argsort(perm)], x)


@given(st.integers(0, 30), st.integers(1, 8), st.integers(1, 8), st.integers(0, 30))
def test_rope_positions(before, gh, gw, after):
    pad = 99
    ids = [1] * before + [pad] * (gh * gw) + [2] * after
    pos = rope_index(ids, [(1, 2 * gh, 2 * gw)], pad, 2)
    text = list(range(before)) + list(range(before + gh * gw, len(ids)))
    for a in range(3):  # text advances by exactly one on every axis
        steps = pos[a, text].diff()
        assert (steps[: max(before - 1, 0)] == 1).all() and (pos[a, before + gh * gw :].diff() == 1).all()
    image = pos[:, before : before + gh * gw]
    assert (image[0] == before).all()  # T constant
    assert torch.equal(image[1].view(gh, gw), before + torch.arange(gh)[:, None].expand(gh, gw))
    assert torch.equal(image[2].view(gh, gw), before + torch.arange(gw).expand(gh, gw))
    if after:
        assert pos[:, before + gh * gw].min() == pos[:, : before + gh * gw].max() + 1


@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
def test_mean_pool_ignores_what_is_masked(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(sum(lengths), 8, generator=g)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    mask = torch.rand(len(h), generator=g) < 0.7
    mask[torch.tensor(cu[:-1])] = True  # every sequence keeps at least one token
    groups = [torch.arange(cu[b], cu[b + 1])[mask[cu[b] : cu[b + 1]]] for b in range(len(lengths))]
    pooled = mean_rows(h, groups)
    noisy = h.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), 8, generator=g) * 1e3  # padding may hold anything
    assert torch.equal(mean_rows(noisy, groups), pooled)
    for b in range(len(lengths)):
        rows = h[cu[b] : cu[b + 1]][mask[cu[b] : cu[b + 1]]]
        # two fp32 sums of the same terms in other orders, then one division: Higham's bound, twice
        tol = 2 * (gamma(len(rows)) * rows.abs().sum(0) / len(rows) + torch.finfo(torch.float32).eps * rows.abs().max())
        assert ((pooled[b] - rows.mean(0)).abs() <= tol).all()


@settings(max_examples=12, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=60), min_size=1, max_size=5), st.integers(0, 4))
def test_embedding_does_not_depend_on_the_batch(models, rounding, texts, k):
    """Padding and batch company change nothing: each text alone equals it inside any batch."""
    model = models("gqa2-sharded")
    texts = [t.encode("utf-8", "replace").decode("utf-8") for t in texts]  # no lone surrogates
    batch = model.encode_text(texts + ["a much longer neighbour " * (k + 1)], task="retrieval")
    for t, v in zip(texts, batch):
        assert (model.encode_text(t, task="retrieval") - v).abs().max() <= SAME * rounding("gqa2-sharded", "text")


# Pieces that stress a cut before tokenizing: combining marks (NFC composes and reorders them), Hangul jamo,
# whitespace runs (the pre-tokenizer's lookahead), added tokens, long words and the longest tokens.
PIECES = ["a", "é", "e\u0301", "\u0323\u0301", " ", "   ", "\n", "1", "!?", "'s", "<|im_start|>", "<|im_end|>"]
PIECES += ["海平面", "\u1100\u1161\u11a8", "\u1161", "\u1f6f", "\u03a9\u0314\u0342\u0345", "🚀\u200d"]
PIECES += ["x" * 40, " " * 30, "-" * 20, "ĠĠ"]


@pytest.fixture(scope="module")
def processors(models):
    """The tiny checkpoints' processor (longest token: 20 characters) and the same with Qwen's real vocabulary
    (longest token: 128 bytes)."""
    from synthetic import qwen_tokenizer

    tiny = models("gqa2-sharded").processor
    qwen = copy.copy(tiny)
    qwen.tokenizer = qwen_tokenizer()
    qwen.token_chars = max(map(len, qwen.tokenizer.get_vocab(with_added_tokens=True)))
    assert (tiny.token_chars, qwen.token_chars) == (20, 128)
    return {"tiny": tiny, "qwen": qwen}


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=400), st.integers(1, 8), st.sampled_from(["tiny", "qwen"]))
def test_a_text_cut_before_tokenizing_keeps_the_same_tokens(processors, pieces, n, which):
    """Processor.tokenize reads a long text only as far as n tokens could reach: the kept ids and offsets are
    the whole text's first n, and `dropped` is exact, or a true lower bound when the text was cut."""
    p = processors[which]
    text = "".join(pieces)
    full = p.tokenizer.encode(text, add_special_tokens=True)
    item = p.tokenize([text], n)[0]
    assert item.input_ids == full.ids[:n] and item.offsets == full.offsets[:n]
    exact = max(0, len(full.ids) - n)
    assert item.dropped == exact if not item.cut else 1 <= item.dropped <= exact


def test_only_the_start_of_a_long_text_is_tokenized(processors, monkeypatch):
    p, seen = processors["qwen"], []
    encode_batch = p.tokenizer.encode_batch

    class Recording:  # tokenizers.Tokenizer's methods are read-only: wrap the object instead
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def encode_batch(self, texts, **kw):
            seen.extend(map(len, texts))
            return encode_batch(texts, **kw)

    tokenizer = p.tokenizer
    monkeypatch.setattr(p, "tokenizer", Recording())
    text = "the sea rises along the coast; " * 200_000  # 6.2 M characters, 1.4 M tokens
    item = p.tokenize([text], 100)[0]
    assert seen == [(100 + 2) * 128] and item.cut == len(text) - seen[0] and len(item.input_ids) == 100
    assert item.input_ids == tokenizer.encode(text[:5000]).ids[:100]
    word = "a" * 50_000  # one word longer than the cut: it is tokenized whole, so nothing is guessed
    item = p.tokenize([word], 100)[0]
    assert item.cut == 0 and item.dropped == len(tokenizer.encode(word).ids) - 100
