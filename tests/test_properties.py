"""Property tests (hypothesis) for the pure functions and the pooling."""

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
