"""Late interaction (MaxSim), late chunking, similarity maps and the research hooks."""

import time

import pytest
import torch
import torch.nn.functional as F

from jina_v4 import encode_chunks, similarity_map
from jina_v4.apps.chunking import anchors, chunk_rows, sentence_spans, token_chunks
from jina_v4.apps.scoring import maxsim, pad_multivectors

from conftest import padded_hidden_states
from tolerances import FP32, gamma

torch.manual_seed(0)


def maxsim_bound(qs, ds) -> float:
    """Two fp32 MaxSim computations of unit vectors: each dot product is within γ_P of exact (Σ|q_p d_p| <= 1),
    a max moves by no more than its arguments, and the sum of L terms of size <= 1 adds γ_L·L; twice that for
    two computations. Higham's bound: it holds for any summation order, on any CPU."""
    L, P = max(len(q) for q in qs), qs[0].shape[-1]
    return 2 * L * (gamma(P) + gamma(L))


def ragged(n, lo, hi, dim=16, dtype=torch.float32):
    return [F.normalize(torch.randn(int(torch.randint(lo, hi, ())), dim), dim=-1).to(dtype) for _ in range(n)]


def plain_loop(qs, ds):
    return torch.tensor([[sum(max(float(q_t @ d_s) for d_s in d) for q_t in q) for d in ds] for q in qs])


def colpali(qs, ds):
    """colpali-engine's score_multi_vector on zero-padded inputs: einsum, max over document tokens, sum."""
    q = torch.nn.utils.rnn.pad_sequence(qs, batch_first=True)
    d = torch.nn.utils.rnn.pad_sequence(ds, batch_first=True)
    return torch.einsum("bnd,csd->bcns", q, d).max(dim=3)[0].sum(dim=2)


def test_maxsim_equals_plain_loop_and_colpali():
    qs, ds = ragged(5, 2, 9), ragged(7, 3, 30)
    got = maxsim(qs, ds)
    tol = maxsim_bound(qs, ds)
    assert (got - plain_loop(qs, ds)).abs().max() <= tol
    # colpali's formula on padded inputs: identical wherever a padding row cannot win the max, i.e. whenever
    # each query token has a non-negative best match (always so for real embeddings of related inputs)
    ds_pos = [d.abs() for d in ds]
    qs_pos = [q.abs() for q in qs]
    assert (maxsim(qs_pos, ds_pos) - colpali(qs_pos, ds_pos)).abs().max() <= tol
    # chunked equals unchunked; padded (N, L, P) input equals the ragged list
    assert (maxsim(qs, ds, batch_size=2) - got).abs().max() <= tol
    assert (maxsim(qs, ds, max_elements=500) - got).abs().max() <= tol  # memory-bound document blocks
    assert (maxsim(pad_multivectors(qs)[0], pad_multivectors(ds)[0]) - got).abs().max() <= tol


def test_maxsim_masks_padding_where_colpali_lets_it_win():
    q = [torch.tensor([[1.0, 0.0]])]
    docs = [torch.tensor([[-1.0, 0.0]]), torch.tensor([[-1.0, 0.0], [0.0, -1.0], [-0.6, -0.8]])]
    assert maxsim(q, docs).tolist() == [[-1.0, -0.0]]  # the first document's only token scores -1
    assert colpali(q, docs)[0, 0] == 0  # colpali: a zero padding row of the first document "matches" at 0


def test_maxsim_bf16_accumulates_in_fp32():
    qs, ds = ragged(3, 20, 40, 128, torch.bfloat16), ragged(4, 100, 300, 128, torch.bfloat16)
    exact = plain_loop([q.float() for q in qs], [d.float() for d in ds])
    got = maxsim(qs, ds)
    # bf16 inputs are exact in fp32, so the fp32 bound holds; a bf16 running sum would be ~2^16 times off
    assert got.dtype == torch.float32 and (got - exact).abs().max() <= maxsim_bound(qs, ds)


def test_pad_multivectors():
    vs = ragged(3, 1, 6)
    padded, mask = pad_multivectors(vs)
    assert padded.shape == (3, max(len(v) for v in vs), 16)
    for p, m, v in zip(padded, mask, vs):
        assert torch.equal(p[m], v) and not p[~m].any()


def test_chunkers():
    text = "First sentence. Second one!  Third?\nA line without a stop\n最后一句。还有一句"
    spans = sentence_spans(text)
    assert [text[a:b] for a, b in spans] == [
        "First sentence.",
        "Second one!",
        "Third?",
        "A line without a stop",
        "最后一句。",
        "还有一句",
    ]
    text = "abc de fgh\U0001f680 ijk"
    offsets = [(-3, 0), (-1, 3), (3, 6), (6, 10), (10, 11), (10, 11), (11, 15)]  # the 🚀 is two tokens
    anchor = anchors(text, offsets)
    assert anchor == [-1, 0, 4, 7, 10, 10, 12]  # prefix; "abc" begins in the prefix; leading spaces skipped
    assert token_chunks(anchor, 2, 15) == [(0, 7), (7, 10), (10, 15)]  # the 🚀 goes whole to the later group
    assert token_chunks(anchor, 4, 15) == [(0, 10), (10, 15)]  # a group boundary never splits the 🚀
    assert [g.tolist() for g in chunk_rows(anchor, [(0, 5), (5, 15), (3, 11), (13, 15)])] == [
        [1, 2],
        [3, 4, 5, 6],
        [2, 3, 4, 5],
        [],
    ]


def test_chunk_rows_match_the_rule_and_stay_linear():
    """chunk_rows equals the rule read directly (a token is in the span holding its anchor), for shuffled,
    overlapping and empty spans; and a million sentence spans over 32,768 tokens take seconds and no
    (chunks, tokens) mask: the memory of a mask would be 32 GB."""
    g = torch.Generator().manual_seed(0)
    anchor = sorted(torch.randint(-1, 500, (300,), generator=g).tolist())
    spans = [tuple(sorted(torch.randint(0, 520, (2,), generator=g).tolist())) for _ in range(200)]
    for (a, b), rows in zip(spans, chunk_rows(anchor, spans)):
        assert rows.tolist() == [i for i, x in enumerate(anchor) if a <= x < b]
    text = "A short sentence. " * 1_000_000  # 18 MB, a million sentences
    spans = sentence_spans(text)
    anchor = [i * 18 for i in range(32_768)]  # one token a sentence, as far as the cut keeps
    start = time.monotonic()
    rows = chunk_rows(anchor, spans)
    assert time.monotonic() - start < 120  # a mask would allocate 32 GB here (and fail or swap for hours)
    assert len(rows) == 1_000_000 and rows[5].tolist() == [5] and len(rows[-1]) == 0


def anchor_of(text, a, b):
    """The test's own reading of the rule: a token's first non-whitespace character of the text, else -1."""
    return next((i for i in range(max(a, 0), max(b, 0)) if not text[i].isspace()), -1)


DOC = (
    "Coastal cities face rising seas. Storm surges grow stronger every decade! "
    "Salt water reaches the wells?\n海平面上升威胁沿海城市。Adaptation costs money."
)


@pytest.mark.parity
@pytest.mark.parametrize("chunks", ["sentences", 7, [(0, 10), (10, 60), (60, len(DOC))]])
def test_late_chunking_equals_reference_hidden_states(name, models, references, rounding, chunks):
    model, ref = models(name), references(name)
    vecs, spans = encode_chunks(model, DOC, chunks=chunks, task="retrieval")
    tol = FP32 * rounding(name, run=lambda m: encode_chunks(m, DOC, chunks=chunks, task="retrieval")[0])
    b = ref.text_batch([DOC], "retrieval", "passage")
    h = ref.hidden(b["input_ids"], b["attention_mask"], "retrieval")[0]
    # the reference tokenizer's own offsets, shifted past "Passage: "; a token goes to the chunk of its first char
    offsets = ref.tokenizer(f"Passage: {DOC}", return_offsets_mapping=True)["offset_mapping"]
    shift = len("Passage: ")
    anchor = torch.tensor([anchor_of(DOC, a - shift, b - shift) for a, b in offsets])
    assert len(spans) == len(vecs) > 1
    for (a, c), v in zip(spans, vecs):
        rows = (anchor >= a) & (anchor < c)
        expected = F.normalize(h[rows].mean(0), dim=0)
        assert (v - expected).abs().max() <= tol
    if chunks == "sentences":
        assert [DOC[a:c] for a, c in spans][-2:] == ["海平面上升威胁沿海城市。", "Adaptation costs money."]


def test_late_chunking_errors(models):
    model = models("gqa2-sharded")
    with pytest.raises(ValueError, match=r"chunk span \(5, 3\)"):
        encode_chunks(model, DOC, chunks=[(5, 3)], task="code")
    with pytest.raises(ValueError, match="has no tokens left after truncation at max_length=8"):
        encode_chunks(model, DOC, chunks="sentences", task="code", max_length=8)
    v, _ = encode_chunks(model, DOC, task="code", truncate_dim=16)
    assert v.shape[1] == 16 and torch.allclose(v.norm(dim=-1), torch.ones(len(v)))


def test_similarity_map(models):
    from PIL import Image

    model = models("gqa2-sharded")
    img = Image.new("RGB", (150, 100), (120, 30, 200))
    heat = similarity_map(model, "a purple page", img, task="retrieval")
    item = model.processor.image_item(img, "retrieval")
    assert heat.shape == (item.grid[1] // 2, item.grid[2] // 2)
    q = model.encode_text("a purple page", task="retrieval", return_multivector=True)
    d = model.encode_image(img, task="retrieval", return_multivector=True)
    rows = torch.tensor(item.input_ids) == model.config.image_token_id
    # each cell's score is MaxSim of the query against that cell alone (two fp32 sums of the same products)
    cells = [d[i : i + 1] for i in rows.nonzero().flatten()]
    assert (heat.flatten() - maxsim([q], cells)[0]).abs().max() <= maxsim_bound([q], cells)


@pytest.mark.parity
def test_all_hidden_states_match_reference(models, references, rounding):
    model, ref = models("gqa4-single"), references("gqa4-single")
    b = ref.text_batch(["one text", "and a second, longer text"], "code")
    run = lambda m: padded_hidden_states(m, b["input_ids"], b["attention_mask"], task="code", all_layers=True)  # noqa
    ours = run(model)
    tol = FP32 * rounding("gqa4-single", run=run)
    theirs = ref.hidden(b["input_ids"], b["attention_mask"], "code", output_hidden_states=True)
    assert len(ours) == len(theirs) == model.config.text_config.num_hidden_layers + 1
    m = b["attention_mask"].bool()
    for a, t in zip(ours, theirs):
        assert (a[m] - t[m]).abs().max() <= tol


@pytest.mark.parity
def test_bidirectional_switch_matches_reference_with_full_mask(models, references):
    from tolerances import float64_copy, fp32_error

    model, ref = models("gqa2-sharded"), references("gqa2-sharded")
    b = ref.text_batch(["attention both ways"], "retrieval")
    causal = padded_hidden_states(model, b["input_ids"], task="retrieval")
    for layer in model.model.layers:
        layer.self_attn.causal = False
    try:
        both_ways = padded_hidden_states(model, b["input_ids"], task="retrieval")
        tol = FP32 * fp32_error(
            float64_copy(model), lambda m: padded_hidden_states(m, b["input_ids"], task="retrieval")
        )
    finally:
        for layer in model.model.layers:
            layer.self_attn.causal = True
    L = b["input_ids"].shape[1]
    full = torch.zeros(1, 1, L, L)  # a 4-D additive mask that hides nothing
    ref.peft.set_adapter("retrieval")
    pos = torch.arange(L).expand(3, 1, L)
    with torch.no_grad():
        expected = ref.ref.model(input_ids=b["input_ids"], attention_mask=full, position_ids=pos).last_hidden_state
    assert (both_ways - expected).abs().max() <= tol
    assert (both_ways - causal).abs().max() > 100 * tol


@pytest.mark.parity
def test_add_task_starts_as_the_base_model(checkpoints, references):
    from jina_v4 import JinaV4

    from tolerances import float64_copy, fp32_error

    model = JinaV4.from_pretrained(checkpoints["gqa2-sharded"], device="cpu")
    model.add_task("legal")
    ref = references("gqa2-sharded")
    b = ref.text_batch(["a contract clause"], "retrieval")
    run = lambda m: padded_hidden_states(m, b["input_ids"], task="legal")  # noqa: E731
    got = run(model)
    tol = FP32 * fp32_error(float64_copy(model), run)
    with torch.no_grad(), ref.peft.disable_adapter():
        pos = torch.arange(b["input_ids"].shape[1]).expand(3, 1, -1)
        base = ref.ref.model(input_ids=b["input_ids"], position_ids=pos).last_hidden_state
    assert (got - base).abs().max() <= tol
    assert "legal" in model.config.task_names and model.encode_text("x", task="legal").shape == (64,)


def test_maxsim_edge_cases():
    import numpy as np

    qs, ds = ragged(3, 2, 6), ragged(4, 3, 9)
    expected = maxsim(qs, ds)
    assert torch.allclose(maxsim([q.numpy() for q in qs], [d.numpy() for d in ds]), expected)  # numpy inputs
    assert torch.allclose(maxsim(pad_multivectors(qs)[0].numpy(), ds), expected)
    assert maxsim([], ds).shape == (0, 4) and maxsim(qs, []).shape == (3, 0)  # empty lists: empty scores
    with pytest.raises(ValueError, match=r"queries\[1\] has no vectors \(0 tokens\)"):
        maxsim([qs[0], torch.empty(0, 16)], ds)
    with pytest.raises(ValueError, match=r"documents\[2\] has no vectors"):
        maxsim(qs, ds[:2] + [np.zeros((0, 16), dtype=np.float32)] + ds[2:])
    with pytest.raises(ValueError, match=r"documents\[0\] has no vectors"):  # an all-zero row of a padded tensor
        maxsim(qs, torch.zeros(2, 5, 16))
    with pytest.raises(ValueError, match="queries have 16-d vectors, documents 8-d"):
        maxsim(qs, ragged(2, 2, 4, dim=8))
    assert maxsim([q.double() for q in qs], ds).dtype == torch.float64


def test_truncate_dim_with_multivectors_is_refused(models):
    model = models("gqa2-sharded")
    with pytest.raises(ValueError, match="truncate_dim applies to single vectors"):
        model.encode_text("x", task="code", truncate_dim=8, return_multivector=True)
