"""Text parity in fp32 on CPU against transformers + peft, run one text at a time. Bounds: FP32 x E, E the
checkpoint's emulated fp32 error (tolerances.py; the `rounding` fixture); SAME x E within jina_v4."""

import pytest
import torch

from jina_v4.model.processing import Item, token_batches

from conftest import padded_hidden_states
from tolerances import FP32, SAME

pytestmark = pytest.mark.parity

TEXTS = [
    "hello",
    "Overview of climate change impacts on coastal cities",
    "気候変動が沿岸都市に与える影響の概要",
    "تأثير تغير المناخ على المدن الساحلية",
    "emoji 🚀🌍✨ and a zero-width joiner 👩‍💻",
    "def add(a, b):\n    return a + b\n" * 6,
    "A long passage. " * 60,
    "  leading and trailing spaces  ",
]
TASKS = ["retrieval", "text-matching", "code"]


def reference_each(ref, texts, task, prompt_name="query", **kw):
    out = [ref.encode_text([t], task, prompt_name, **kw) for t in texts]
    return torch.cat(out) if not kw.get("multivector") else [o[0] for o in out]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("prompt_name", ["query", "passage"])
def test_single_and_multi_vectors(name, models, references, rounding, task, prompt_name):
    model, ref = models(name), references(name)
    ours = model.encode_text(TEXTS, task=task, prompt_name=prompt_name, batch_size=3)
    theirs = reference_each(ref, TEXTS, task, prompt_name)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= FP32 * rounding(name, "text")
    ours_m = model.encode_text(TEXTS, task=task, prompt_name=prompt_name, return_multivector=True)
    theirs_m = reference_each(ref, TEXTS, task, prompt_name, multivector=True)
    for a, b in zip(ours_m, theirs_m):
        assert a.shape == b.shape  # one row per token, padding removed
        assert (a - b).abs().max() <= FP32 * rounding(name, "text-multi")


def test_prefixes(models, references):
    """text-matching uses the query prefix on both sides; the other tasks distinguish query and passage."""
    model, ref = models("gqa2-sharded"), references("gqa2-sharded")
    q = model.encode_text(TEXTS[:2], task="text-matching", prompt_name="query")
    p = model.encode_text(TEXTS[:2], task="text-matching", prompt_name="passage")
    assert torch.equal(q, p)
    q = model.encode_text(TEXTS[:2], task="retrieval", prompt_name="query")
    p = model.encode_text(TEXTS[:2], task="retrieval", prompt_name="passage")
    assert (q - p).abs().max() > 1e-3
    ids = model.processor.tokenize(["Passage: hello"], 100)[0].input_ids
    assert ids == ref.tokenizer("Passage: hello")["input_ids"]


def test_tokenization_matches_reference(name, models, references):
    model, ref = models(name), references(name)
    prompts = [f"Query: {t}" for t in TEXTS] + ["<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>x"]
    expected = [ref.tokenizer(p)["input_ids"] for p in prompts]
    assert [it.input_ids for it in model.processor.tokenize(prompts)] == expected


@pytest.mark.filterwarnings("ignore:.*tokens past max_length")  # the warning itself: test_robustness.py
@pytest.mark.parametrize("max_length", [1, 5, 17])
def test_truncation(models, references, rounding, max_length):
    model, ref = models("gqa4-single"), references("gqa4-single")
    run = lambda m: m.encode_text(TEXTS, task="retrieval", max_length=max_length)  # noqa: E731
    theirs = reference_each(ref, TEXTS, "retrieval", max_length=max_length)
    assert (run(model) - theirs).abs().max() <= FP32 * rounding("gqa4-single", "text", run=run)
    rows = model.encode_text(TEXTS, task="retrieval", max_length=max_length, return_multivector=True)
    kept = [ref.text_batch([t], "retrieval", max_length=max_length)["input_ids"][0].tolist() for t in TEXTS]
    assert [len(k) for k in kept] == [
        min(max_length, len(ref.text_batch([t], "retrieval")["input_ids"][0])) for t in TEXTS
    ]
    # the kept ids exactly (an off-by-one cut shows here, not only as an empty sequence at max_length=1)
    assert [it.input_ids for it in model.prepare(TEXTS, "retrieval", max_length=max_length)] == kept
    assert [r.shape[0] for r in rows] == [len(k) for k in kept]


def test_truncate_dim(name, models, references, rounding):
    model, ref = models(name), references(name)
    for dim in model.config.matryoshka_dims:
        run = lambda m: m.encode_text(TEXTS, task="code", truncate_dim=dim)  # noqa: E731
        ours = run(model)
        theirs = reference_each(ref, TEXTS, "code", truncate_dim=dim)
        assert ours.shape == (len(TEXTS), dim)
        # renormalising the first `dim` components scales their errors up: E of these very outputs
        assert (ours - theirs).abs().max() <= FP32 * rounding(name, "text", run=run)
        assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)))


def test_mixed_task_batch_equals_per_task(name, models, rounding):
    model = models(name)
    tasks = [TASKS[i % 3] for i in range(len(TEXTS))]
    for multivector in (False, True):
        mixed = model.encode_text(TEXTS, task=tasks, return_multivector=multivector, batch_size=len(TEXTS))
        same_batch = {
            t: model.encode_text(TEXTS, task=t, return_multivector=multivector, batch_size=len(TEXTS)) for t in TASKS
        }
        for i, (t, task) in enumerate(zip(TEXTS, tasks)):
            # the same batch under one task: other tasks' rows add exactly 0 (lora.py), the same products
            assert torch.equal(mixed[i], same_batch[task][i])
            alone = model.encode_text(t, task=task, return_multivector=multivector)
            kind = "text-multi" if multivector else "text"
            assert (mixed[i] - alone).abs().max() <= SAME * rounding(name, kind)


def test_tasks_differ(models):
    model = models("gqa2-sharded")
    r, c = (model.encode_text(TEXTS, task=t) for t in ("retrieval", "code"))
    assert (r - c).abs().max() > 1e-3  # the adapters are really applied


def test_merged_equals_unmerged(name, models, rounding):
    model = models(name)
    for task in TASKS:
        plain = model.encode_text(TEXTS, task=task, return_multivector=True)
        model.merge(task)
        try:
            merged = model.encode_text(TEXTS, task=task, return_multivector=True)
            other = model.encode_text(TEXTS, task="code" if task != "code" else "retrieval")
        finally:
            model.merge(None)
        for a, b in zip(plain, merged):
            # W + s·BA rounded once: one more fp32 rounding of every adapted weight, within one E of the
            # unmerged run's own, and the unmerged run's E: as two implementations
            assert (a - b).abs().max() <= FP32 * rounding(name, "text-multi")
        # a task other than the merged one still runs on the untouched base weights
        assert torch.equal(other, model.encode_text(TEXTS, task="code" if task != "code" else "retrieval"))


def test_batching_invariance(models, rounding):
    model = models("gqa2-sharded")
    one = torch.cat([model.encode_text([t], task="retrieval") for t in TEXTS])
    for bs in (2, 5, 100):
        got = model.encode_text(TEXTS, task="retrieval", batch_size=bs)
        assert (got - one).abs().max() <= SAME * rounding("gqa2-sharded", "text")


def test_return_conventions(models):
    model = models("gqa2-sharded")
    v = model.encode_text("hi", task="retrieval")
    assert v.shape == (model.config.text_config.hidden_size,) and v.device.type == "cpu"
    n = model.encode_text(["hi", "there"], task="retrieval", return_numpy=True)
    assert n.shape == (2, model.config.text_config.hidden_size) and n.dtype.name == "float32"
    m = model.encode_text(["hi", "there"], task="retrieval", return_multivector=True, return_numpy=True)
    assert [x.shape[1] for x in m] == [model.config.multi_vector_projector_dim] * 2
    model.task = "code"
    try:
        assert torch.equal(model.encode_text("hi"), model.encode_text("hi", task="code"))
    finally:
        model.task = None


def test_last_hidden_states_matches_reference(name, models, references, rounding):
    model, ref = models(name), references(name)
    batch = ref.text_batch(TEXTS, "retrieval")
    run = lambda m: padded_hidden_states(m, batch["input_ids"], batch["attention_mask"], task="retrieval")  # noqa
    ours = run(model)
    tol = FP32 * rounding(name, run=run)
    for i, text in enumerate(TEXTS):
        b = ref.text_batch([text], "retrieval")
        theirs = ref.hidden(b["input_ids"], b["attention_mask"], "retrieval")[0]
        n = theirs.shape[0]
        assert (ours[i, :n] - theirs).abs().max() <= tol
        assert not ours[i, n:].any()  # padding rows are zero


def test_token_budget_batches(models, rounding):
    """Batches: longest first, within max_batch_tokens and batch_size; results in input order either way."""
    model = models("gqa4-single")
    items = [Item(list(range(n)), "code") for n in (5, 40, 17, 40, 3, 90)]
    assert token_batches(items, 80) == [[5], [1, 3], [2, 0, 4]]
    assert token_batches(items, 80, 2) == [[5], [1, 3], [2, 0], [4]]
    # one long text and many short ones: the padded attention grid (items x longest) stays within the budget
    crowd = [Item([0] * 700, "code")] + [Item([0] * 10, "code") for _ in range(300)]
    batches = token_batches(crowd, 1000)
    assert batches[0] == [0] and all(len(b) * max(len(crowd[i].input_ids) for i in b) <= 1000 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(301))
    model.max_batch_tokens = 80
    try:
        budget = model.encode_text(TEXTS, task="code")
    finally:
        model.max_batch_tokens = 16384
    assert (budget - model.encode_text(TEXTS, task="code", batch_size=1)).abs().max() <= SAME * rounding(
        "gqa4-single", "text"
    )
    with pytest.raises(ValueError, match="batch_size must be a positive int or None, got 0"):
        model.encode_text(TEXTS, task="code", batch_size=0)


def test_rmsnorm_epsilon_matters_end_to_end(checkpoints, tmp_path):
    """Token embeddings scaled by 1e-3 put every first RMSNorm where eps dominates: parity still holds, and a
    model with eps 1e-5 instead of 1e-6 misses it by orders of magnitude."""
    import shutil

    from safetensors.torch import load_file, save_file

    from jina_v4 import JinaV4

    from reference import Reference
    from tolerances import float64_copy, fp32_error

    path = shutil.copytree(checkpoints["gqa4-single"], tmp_path / "small")
    w = load_file(path / "model.safetensors")
    w["model.embed_tokens.weight"] = w["model.embed_tokens.weight"] * 1e-3
    save_file(w, path / "model.safetensors")
    model, ref = JinaV4.from_pretrained(path, device="cpu"), Reference(path)
    run = lambda m: m.encode_text(TEXTS, task="retrieval")  # noqa: E731
    tol = FP32 * fp32_error(float64_copy(model), run)  # this checkpoint's own amplification
    theirs = reference_each(ref, TEXTS, "retrieval")
    assert (run(model) - theirs).abs().max() <= tol
    for m in model.modules():
        if hasattr(m, "eps"):
            m.eps = 1e-5
    assert (run(model) - theirs).abs().max() > 100 * tol
