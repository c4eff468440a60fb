"""Training (jina_v4/training.py): one task's LoRA gradients against the reference (transformers 4.52.4 + peft
0.15.2, its own LoRA parameters and autograd) for a loss of single and multi-vectors over texts of mixed lengths
and images, relative 1e-5 in fp32 and 1e-10 in float64; each loss against a plain loop; GradCache and gradient
checkpointing against the plain backward; differentiable embeddings against inference."""

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from jina_v4.apps.training import (
    Embeddings,
    backward,
    cosent,
    cosent_loss,
    distill,
    embed,
    embed_items,
    info_nce,
    joint_loss,
    late_scores,
    matryoshka_loss,
    retrieval_loss,
    trainable,
)
from jina_v4.model.images import image_patches, load_image
from jina_v4.model.loading import adapter_key

from conftest import model_cache
from oracle64 import float64_islands
from test_images import IMAGE_CFG, picture
from tolerances import FP32, SAME, NarrowStorage, fp32_runs

TASK = "code"
QUERIES = ["hello", "Overview of climate change impacts on coastal cities", "def add(a, b): return a + b"]
PASSAGES = [
    "The impacts of climate change on coastal cities are significant.",
    picture(100, 140, 1, noise=12),
    "x",
    picture(60, 200, 2, noise=12),
]
NEGATIVES = ["気候変動が沿岸都市に与える影響", "A long passage. " * 12]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fresh(checkpoints):
    """Models of this module's own (trainable() and add_task change them), per (name, dtype)."""
    return model_cache(checkpoints)


def loss_of(q, p, n):
    """Dense NCE (Matryoshka at 8 dims and all), late NCE and their KL: single and multi-vectors both count."""
    return retrieval_loss(q, p, n, tau=0.05, dims=[8, None])


def our_gradients(model, task=TASK):
    params = trainable(model, task)
    es = [embed(model, xs, task, pn) for xs, pn in ((QUERIES, "query"), (PASSAGES, "passage"), (NEGATIVES, "passage"))]
    loss = loss_of(*es)
    loss.backward()
    grads = {adapter_key(n): p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return loss.item(), grads


def reference_gradients(ref, task=TASK):
    params = ref.trainable(task)
    es = []
    for xs, pn in ((QUERIES, "query"), (PASSAGES, "passage"), (NEGATIVES, "passage")):
        inputs = [x if isinstance(x, str) else image_patches(load_image(x), IMAGE_CFG) for x in xs]
        single, multi = ref.embed_with_grad(inputs, task, pn)
        padded = pad_sequence(multi, batch_first=True)
        mask = torch.arange(padded.shape[1]) < torch.tensor([len(m) for m in multi])[:, None]
        es.append(Embeddings(torch.stack(single), padded, mask))
    loss = loss_of(*es)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in params.items()}
    for p in params.values():
        p.grad = None
    return loss.item(), grads


GROUPS = ((QUERIES, "query"), (PASSAGES, "passage"), (NEGATIVES, "passage"))


@pytest.fixture(scope="module")
def grad_rounding(fresh):
    """(name, task) -> (E of the gradients as worst_relative measures them, E of the loss): tolerances.py's fp32
    emulation, forward and backward, on a float64 copy. The loss is one number, so its E is taken in the
    worst direction: Σ |∂L/∂e| · |e_fp32 - e| over every embedding element e (first order, no cancellation)."""
    cache = {}

    def get(name, task=TASK):
        if (name, task) not in cache:
            model = fresh(name, "float64")
            narrow, exact = fp32_runs(model, lambda m: our_gradients(m, task)[1])
            es = [embed(model, xs, task, pn) for xs, pn in GROUPS]
            parts = [t for e in es for t in (e.single, e.multi)]
            loss = loss_of(*es)
            grads = torch.autograd.grad(loss, parts)
            with torch.no_grad(), NarrowStorage():
                rounded = [t for e in (embed(model, xs, task, pn) for xs, pn in GROUPS) for t in (e.single, e.multi)]
            loss_e = sum(float((g.abs() * (r - t.detach()).abs()).sum()) for g, r, t in zip(grads, rounded, parts))
            cache[name, task] = worst_relative(narrow, exact), loss_e / abs(float(loss.detach()))
        return cache[name, task]

    return get


def worst_relative(ours: dict, theirs: dict) -> float:
    """max over tensors of max|ours − theirs| / max|theirs|."""
    assert set(ours) == set(theirs) and ours
    for g in theirs.values():
        assert g.abs().max() > 0  # every tensor of the task takes part
    return max(((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max()).item() for k in ours)


@pytest.mark.parity
@pytest.mark.parametrize("name", ["gqa2-sharded", "gqa4-single", "mha-bf16"])
def test_gradient_parity_fp32(name, fresh, references, grad_rounding):
    """mha-bf16: M-RoPE sections (2, 2, 4) differ between height and width; r = 2, alpha = 5. FP32 x E
    (tolerances.py), E from the gradients' and the loss's own emulated rounding."""
    loss, ours = our_gradients(fresh(name))
    ref_loss, theirs = reference_gradients(references(name))
    print(f"{name} fp32: loss {abs(loss - ref_loss) / abs(ref_loss):.1e}, gradients {worst_relative(ours, theirs):.1e}")
    grad_e, loss_e = grad_rounding(name)
    assert abs(loss - ref_loss) <= FP32 * loss_e * abs(ref_loss)
    assert worst_relative(ours, theirs) <= FP32 * grad_e


@pytest.mark.parity
@pytest.mark.parametrize("name", ["mha-bf16", "gqa4-single"])
def test_gradient_parity_float64(name, fresh, reference_checkpoints):
    from reference import Reference

    loss, ours = our_gradients(fresh(name, "float64"))
    with float64_islands():
        ref_loss, theirs = reference_gradients(Reference(reference_checkpoints[name], dtype=torch.float64))
    print(
        f"{name} float64: loss {abs(loss - ref_loss) / abs(ref_loss):.1e}, gradients {worst_relative(ours, theirs):.1e}"
    )
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss)
    assert worst_relative(ours, theirs) <= 1e-10


def test_embed_is_the_inference_forward(fresh, rounding):
    model = fresh("gqa2-sharded")
    inputs = QUERIES + PASSAGES
    params = trainable(model, "retrieval")
    seen = []
    hook = model.visual.register_forward_hook(lambda m, args, out: seen.append(out.requires_grad))
    try:
        e = embed(model, inputs, "retrieval", "passage")
    finally:
        hook.remove()
    assert seen == [False]  # the vision tower records no graph
    assert e.single.requires_grad and e.multi.requires_grad and e.mask.dtype == torch.bool
    single = model.encode(inputs, task="retrieval", prompt_name="passage")
    multi = model.encode(inputs, task="retrieval", prompt_name="passage", return_multivector=True)
    # the same arithmetic in another batch layout (training adds out of place): SAME x E (tolerances.py)
    assert (e.single - single).abs().max() <= SAME * rounding("gqa2-sharded", "text", "image")
    for row, m, ref in zip(e.multi, e.mask, multi):
        assert int(m.sum()) == len(ref) and not m[len(ref) :].any()
        assert (row[: len(ref)] - ref).abs().max() <= SAME * rounding("gqa2-sharded", "text-multi", "image-multi")
        assert not row[len(ref) :].any()
    (e.single.sum() + e.multi.sum()).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(params) and all(p.requires_grad == (n in params) for n, p in model.named_parameters())
    for p in params.values():
        p.grad = None
    with torch.no_grad():  # deterministic: bit-identical to inference whatever shares the batch
        alone = embed(model, inputs[:1], "retrieval", "passage", deterministic=True)
        together = embed(model, inputs, "retrieval", "passage", deterministic=True)
    expected = model.encode(inputs[:1], task="retrieval", prompt_name="passage", deterministic=True)
    assert torch.equal(alone.single, expected) and torch.equal(together.single[:1], expected)
    assert torch.equal(together.multi[:1, : alone.multi.shape[1]], alone.multi)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        embed(model, ["a"], "retrieval")


def test_add_task_copy_and_refusals(fresh):
    model = fresh("gqa2-sharded")
    model.add_task("stage2", init_from="retrieval")
    a = model.encode_text(QUERIES, task="stage2")
    assert torch.equal(a, model.encode_text(QUERIES, task="retrieval"))
    with pytest.raises(ValueError, match="r=4 and lora_alpha=8"):
        model.add_task("other", r=16)
    with pytest.raises(ValueError, match="exists already"):
        model.add_task("stage2")


# ---- GradCache, gradient checkpointing -----------------------------------------------------------------------


def gradients(model, params, groups, minibatch=None):
    loss = backward(model, groups, lambda e: loss_of(*e), minibatch)
    grads = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return loss.item(), grads


@pytest.mark.parametrize("name, dtype", [("gqa4-single", "float32"), ("mha-bf16", "float64")])
def test_gradcache_equals_the_full_batch(fresh, grad_rounding, name, dtype):
    """fp32: one implementation in other mini-batches, SAME x E (tolerances.py); float64: the same algorithm,
    to float64 rounding (1e-12: a thousand float64 ulps, as the float64 parity tests)."""
    grad_e, loss_e = grad_rounding(name, "retrieval")
    grad_tol, loss_tol = (SAME * grad_e, SAME * loss_e) if dtype == "float32" else (1e-12, 1e-12)
    model = fresh(name, dtype)
    params = trainable(model, "retrieval")
    groups = [
        model.prepare(xs, "retrieval", pn)
        for xs, pn in ((QUERIES, "query"), (PASSAGES, "passage"), (NEGATIVES, "passage"))
    ]
    loss, full = gradients(model, params, groups)
    for minibatch in (1, 2):
        cached_loss, cached = gradients(model, params, groups, minibatch)
        assert abs(cached_loss - loss) <= loss_tol * abs(loss)
        assert worst_relative(cached, full) <= grad_tol


def test_gradcache_replays_dropout(fresh, grad_rounding):
    """In training mode (LoRA dropout) the second pass must draw the masks of the first: the cached gradients
    equal those of the same mini-batches embedded once, with a graph, from the same RNG state."""
    model = fresh("gqa2-sharded")
    params = trainable(model, "retrieval")
    groups = [
        model.prepare(xs, "retrieval", pn)
        for xs, pn in ((QUERIES, "query"), (PASSAGES, "passage"), (NEGATIVES, "passage"))
    ]
    model.train()
    try:
        torch.manual_seed(3)
        loss, cached = gradients(model, params, groups, minibatch=2)
        torch.manual_seed(3)
        es = [Embeddings.cat([embed_items(model, g[i : i + 2]) for i in range(0, len(g), 2)]) for g in groups]
        plain = loss_of(*es)
        plain.backward()
        expected = {n: p.grad.clone() for n, p in params.items()}
        for p in params.values():
            p.grad = None
        torch.manual_seed(3)
        _, without_replay = gradients(model, params, groups)  # the full batch draws other masks
    finally:
        model.eval()
    grad_e, loss_e = grad_rounding("gqa2-sharded", "retrieval")  # one implementation, two layouts: SAME x E
    assert abs(loss - plain.item()) <= SAME * loss_e * abs(loss)
    assert worst_relative(cached, expected) <= SAME * grad_e
    assert worst_relative(without_replay, expected) > 100 * SAME * grad_e  # dropout is really on


def test_checkpointing_same_gradients(fresh, grad_rounding):
    model = fresh("mha-bf16")
    params = trainable(model, "text-matching")
    groups = [
        model.prepare(xs, "text-matching", pn)
        for xs, pn in ((QUERIES, "query"), (PASSAGES, "passage"), (NEGATIVES, "passage"))
    ]
    _, plain = gradients(model, params, groups)
    model.model.checkpointing = True
    try:
        _, recomputed = gradients(model, params, groups)
    finally:
        model.model.checkpointing = False
    assert worst_relative(recomputed, plain) <= SAME * grad_rounding("mha-bf16", "text-matching")[0]


# ---- each loss against a plain loop ----------------------------------------------------------------------------


def random_embeddings(n, lengths=None, D=12, P=5, seed=0) -> Embeddings:
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [int(x) for x in torch.randint(1, 7, (n,), generator=g)]
    single = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    multi = [
        torch.nn.functional.normalize(torch.randn(L, P, generator=g, dtype=torch.float64), dim=-1) for L in lengths
    ]
    padded = pad_sequence(multi, batch_first=True)
    return Embeddings(single, padded, torch.arange(padded.shape[1]) < torch.tensor(lengths)[:, None])


def late_loop(q: Embeddings, p: Embeddings) -> torch.Tensor:
    out = torch.zeros(len(q), len(p), dtype=torch.float64)
    for a in range(len(q)):
        qa = q.multi[a][q.mask[a]]
        for b in range(len(p)):
            pb = p.multi[b][p.mask[b]]
            out[a, b] = sum(max(float(qi @ pj) for pj in pb) for qi in qa) / len(qa)
    return out


def nce_loop(S, tau):
    return sum(
        -torch.log(torch.exp(S[i, i] / tau) / sum(torch.exp(S[i, j] / tau) for j in range(S.shape[1])))
        for i in range(len(S))
    ) / len(S)


def kl_loop(dense, late, tau):
    total = 0.0
    for i in range(len(dense)):
        P = torch.exp(dense[i] / tau) / torch.exp(dense[i] / tau).sum()
        Q = torch.exp(late[i] / tau) / torch.exp(late[i] / tau).sum()
        total += sum(P[j] * (torch.log(P[j]) - torch.log(Q[j])) for j in range(len(P)))
    return total / len(dense)


def batch_loop(q, p, n, tau, w, dims):
    docs = Embeddings.cat([p, n])
    dense_at = [
        (q.single[:, :d] / q.single[:, :d].norm(dim=-1, keepdim=True))
        @ (docs.single[:, :d] / docs.single[:, :d].norm(dim=-1, keepdim=True)).T
        for d in dims
    ]
    dense = q.single @ docs.single.T
    late = late_loop(q, docs)
    return (
        w[0] * sum(nce_loop(S, tau) for S in dense_at) / len(dims)
        + w[1] * nce_loop(late, tau)
        + w[2] * kl_loop(dense, late, tau)
    )


def test_late_scores_loop():
    q, p = random_embeddings(3, seed=1), random_embeddings(4, seed=2)
    assert (late_scores(q, p) - late_loop(q, p)).abs().max() <= 1e-12
    assert (late_scores(q, p, block=7) - late_loop(q, p)).abs().max() <= 1e-12  # one document per block


def test_nce_and_kl_loops():
    S, T = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    for tau in (0.02, 0.5):
        assert abs(info_nce(S, tau) - nce_loop(S, tau)) <= 1e-9
        assert abs(distill(S, T, tau) - kl_loop(S, T, tau)) <= 1e-9
    assert distill(S, S, 0.1).abs() <= 1e-12 and distill(S, T, 0.1) > 0


def test_joint_and_matryoshka_loops():
    text = (random_embeddings(3, seed=3), random_embeddings(3, seed=4), random_embeddings(2, seed=5))
    multi = (random_embeddings(4, seed=6), random_embeddings(4, seed=7), random_embeddings(3, seed=8))
    w, dims = (0.5, 2.0, 0.3, 1.5, 0.7, 1.1), [4, 8, 12]
    got = joint_loss(text, multi, tau=0.1, weights=w, dims=dims)
    expected = batch_loop(*text, 0.1, w[:3], dims) + batch_loop(*multi, 0.1, w[3:], dims)
    assert abs(got - expected) <= 1e-9
    assert abs(joint_loss(text, None, 0.1, w, [12]) - batch_loop(*text, 0.1, w[:3], [12])) <= 1e-9
    a, b = text[0].single, text[1].single
    got = matryoshka_loss(lambda x, y: (x * y).sum(), a, b, [4, 8])
    expected = (
        sum(
            (a[:, :d] / a[:, :d].norm(dim=-1, keepdim=True) * b[:, :d] / b[:, :d].norm(dim=-1, keepdim=True)).sum()
            for d in (4, 8)
        )
        / 2
    )
    assert abs(got - expected) <= 1e-12


def test_cosent_loop():
    g = torch.Generator().manual_seed(9)
    cos = torch.rand(7, generator=g, dtype=torch.float64) * 2 - 1
    scores = torch.tensor([0.1, 0.5, 0.5, 0.9, 0.0, 0.3, 0.5], dtype=torch.float64)  # ties: no pair
    terms = [torch.exp((cos[l_] - cos[k]) / 0.05) for k in range(7) for l_ in range(7) if scores[k] > scores[l_]]
    assert abs(cosent(cos, scores, 0.05) - torch.log(1 + sum(terms))) <= 1e-9
    a, b = random_embeddings(7, seed=10), random_embeddings(7, seed=11)
    expected = (
        sum(
            cosent(
                (
                    a.single[:, :d]
                    / a.single[:, :d].norm(dim=-1, keepdim=True)
                    * b.single[:, :d]
                    / b.single[:, :d].norm(dim=-1, keepdim=True)
                ).sum(-1),
                scores,
            )
            for d in (6, 12)
        )
        / 2
    )
    assert abs(cosent_loss(a, b, scores, 0.05, [6, 12]) - expected) <= 1e-12
    ordered = torch.linspace(-1, 1, 7, dtype=torch.float64)
    assert cosent(ordered, ordered, 0.05) < 0.01 and cosent(-ordered, ordered, 0.05) > 10  # order agrees: ~0
