"""Training task adapters as the paper trains them (arXiv 2506.18902, §3 and §5): differentiable embeddings
through the same packed forward as inference, the paper's losses, a GradCache-style cached step, and in-batch
negatives gathered across ranks. Only LoRA trains; the backbone, the vision tower and the projector's base
weights stay frozen. saving.py writes a trained task into a checkpoint directory.

Scores, for unit single vectors q, p and unit token vectors q_i, p_j (padding masked):
    dense(q, p) = q·p                      late(q, p) = Σ_i max_j q_i·p_j / (number of query tokens)
Losses, τ a temperature, query i's positive in column i, every other column a negative:
    NCE(S)   = mean_i −log softmax_j(S_ij/τ)[i]      (hard negatives are extra columns: NCE+)
    KL(S, T) = mean_i KL(softmax(S_i/τ) ‖ softmax(T_i/τ))        (neither side detached)
    batch    = w1·NCE(dense) + w2·NCE(late) + w3·KL(dense, late)
    joint    = batch(text pairs; w1..w3) + batch(multimodal pairs; w4..w6)
    Matryoshka: the dense NCE averaged over the truncated, renormalised dims
    CoSENT   = log(1 + Σ_{s_k > s_l} exp((cos_l − cos_k)/τ))        for pairs with scores s
Losses are means over queries (the paper writes sums: a constant factor in the learning rate).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ..model import lora
from ..model.heads import Both, matryoshka
from ..model.processing import MAX_TEXT_TOKENS, Item
from ..pipeline import encode
from .scoring import masked_maxsim


@dataclass
class Embeddings:
    """N inputs: unit single vectors (N, D), unit multi-vectors zero-padded to (N, L, P), and the mask (N, L)."""

    single: torch.Tensor
    multi: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return len(self.single)

    def padded(self, length: int) -> Embeddings:
        """The same rows with multi and mask padded to `length` tokens."""
        extra = length - self.multi.shape[1]
        return Embeddings(self.single, F.pad(self.multi, (0, 0, 0, extra)), F.pad(self.mask, (0, extra)))

    @staticmethod
    def cat(parts: Sequence[Embeddings]) -> Embeddings:
        L = max(e.multi.shape[1] for e in parts)
        parts = [e.padded(L) for e in parts]
        return Embeddings(*(torch.cat([getattr(e, k) for e in parts]) for k in ("single", "multi", "mask")))


def trainable(model: nn.Module, task: str) -> dict[str, nn.Parameter]:
    """Make exactly `task`'s LoRA A/B trainable (every other parameter frozen); returns them by name."""
    model.requires_grad_(False)
    adapted = set(map(id, lora.adapted(model)))
    names = {
        f"{name}.{ab}.{task}" for name, m in model.named_modules() if id(m) in adapted for ab in ("lora_A", "lora_B")
    }
    params = {n: p for n, p in model.named_parameters() if n in names}
    if not params:
        raise ValueError(f"task {task!r} has no adapter in this model (tasks: {list(model.config.task_names)})")
    for p in params.values():
        p.requires_grad_(True)
    return params


# ---- differentiable embeddings ------------------------------------------------------------------------------


def embed_items(model: nn.Module, items: list[Item], deterministic: bool = False) -> Embeddings:
    """Prepared items -> Embeddings, with autograd when grad is enabled. Items run packed, longest first, in
    batches of `model.max_batch_tokens`; no padding token is computed (the multi-vectors are padded after)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError("embed runs outside torch.inference_mode() (its tensors cannot take gradients)")
    if not items:  # e.g. a batch without hard negatives: it still takes part in the gather across ranks
        D, P = model.config.text_config.hidden_size, model.config.multi_vector_projector_dim
        z = torch.zeros(0, D, device=model.device, dtype=torch.promote_types(model.dtype, torch.float32))
        return Embeddings(z, z.new_zeros(0, 0, P), torch.zeros(0, 0, dtype=torch.bool, device=model.device))
    single, multi = zip(*encode(model, items, Both(), deterministic=deterministic))  # (D,), (L_i, P) per item
    lengths = torch.tensor([len(m) for m in multi], device=model.device)
    mask = torch.arange(int(lengths.max()), device=model.device) < lengths[:, None]  # (N, L)
    return Embeddings(torch.stack(single), pad_sequence(list(multi), batch_first=True), mask)


def embed(
    model: nn.Module,
    inputs: Sequence,
    task: str | Sequence[str],
    prompt_name: str = "query",
    max_length: int = MAX_TEXT_TOKENS,
    max_pixels: int | None = None,
    deterministic: bool = False,
) -> Embeddings:
    """The inputs of `model.encode` (texts, images, {"text"}/{"image"} dicts) -> Embeddings with autograd."""
    items = model.prepare(inputs, task, prompt_name, max_length, max_pixels)
    return embed_items(model, items, deterministic)


# ---- scores and losses --------------------------------------------------------------------------------------


def dense_scores(q: torch.Tensor, p: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Cosine of single vectors (Nq, D) x (Np, D) -> (Nq, Np), at Matryoshka `dim` (None: all)."""
    return matryoshka(q, dim) @ matryoshka(p, dim).T


def late_scores(q: Embeddings, p: Embeddings, block: int = 2**26) -> torch.Tensor:
    """(Nq, Np): Σ_i max_j q_i·p_j over real tokens, divided by the query's token count (the training form;
    inference MaxSim does not divide). Documents go in blocks of at most `block` similarity elements."""
    n = q.mask.sum(1, keepdim=True)  # (Nq, 1)
    step = max(1, block // max(1, q.multi.shape[0] * q.multi.shape[1] * p.multi.shape[1]))
    parts = [
        masked_maxsim(q.multi, q.mask, p.multi[a : a + step], p.mask[a : a + step]) for a in range(0, len(p), step)
    ]
    return torch.cat(parts, dim=1) / n


def info_nce(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """scores (B, M >= B), query i's positive in column i; the other columns (the batch's other positives, then
    any hard negatives) are negatives. Mean over queries of −log softmax(scores/τ)[i, i]."""
    return F.cross_entropy(scores / tau, torch.arange(len(scores), device=scores.device))


def distill(dense: torch.Tensor, late: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(softmax(dense/τ) ‖ softmax(late/τ)), row-wise, mean over rows; gradients reach both sides."""
    return F.kl_div(
        F.log_softmax(late / tau, -1), F.log_softmax(dense / tau, -1), reduction="batchmean", log_target=True
    )


def matryoshka_loss(fn: Callable, a: torch.Tensor, b: torch.Tensor, dims: Sequence[int | None] | None) -> torch.Tensor:
    """The mean over `dims` of fn(a_d, b_d), x_d the first d components renormalised (None or []: fn(a, b))."""
    dims = list(dims or [None])
    return sum(fn(matryoshka(a, d), matryoshka(b, d)) for d in dims) / len(dims)


def retrieval_loss(
    q: Embeddings,
    p: Embeddings,
    negatives: Embeddings | None = None,
    tau: float = 0.02,
    weights: Sequence[float] = (1.0, 1.0, 1.0),
    dims: Sequence[int] | None = None,
) -> torch.Tensor:
    """One batch of (query, positive[, hard negatives]): w1·NCE(dense, Matryoshka over `dims`) + w2·NCE(late)
    + w3·KL(dense ‖ late). Every query sees every positive and every hard negative of the batch."""
    docs = p if negatives is None or len(negatives) == 0 else Embeddings.cat([p, negatives])
    dense = dense_scores(q.single, docs.single)
    late = late_scores(q, docs)
    nce = matryoshka_loss(lambda a, b: info_nce(a @ b.T, tau), q.single, docs.single, dims)
    return weights[0] * nce + weights[1] * info_nce(late, tau) + weights[2] * distill(dense, late, tau)


def joint_loss(
    text: tuple | None,
    multimodal: tuple | None,
    tau: float = 0.02,
    weights: Sequence[float] = (1.0,) * 6,
    dims: Sequence[int] | None = None,
) -> torch.Tensor:
    """The paper's L_joint: retrieval_loss on a text batch (w1..w3) plus on a multimodal batch (w4..w6). Each
    batch is (queries, positives) or (queries, positives, hard negatives); either may be None."""
    parts = [
        retrieval_loss(*b, tau=tau, weights=w, dims=dims)
        for b, w in ((text, weights[:3]), (multimodal, weights[3:]))
        if b is not None
    ]
    if not parts:
        raise ValueError("joint_loss needs a text batch, a multimodal batch, or both")
    return sum(parts)


def cosent(cos: torch.Tensor, scores: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """CoSENT on N scored pairs: log(1 + Σ over (k, l) with s_k > s_l of exp((cos_l − cos_k)/τ))."""
    diff = (cos[None, :] - cos[:, None]) / tau  # [k, l] = (cos_l − cos_k)/τ
    diff = diff[scores[:, None] > scores[None, :]]
    return torch.logsumexp(torch.cat([diff.new_zeros(1), diff]), 0)


def cosent_loss(
    a: Embeddings, b: Embeddings, scores: torch.Tensor, tau: float = 0.05, dims: Sequence[int] | None = None
) -> torch.Tensor:
    """CoSENT on the cosines of the pairs (a_k, b_k), averaged over the Matryoshka `dims`."""
    return matryoshka_loss(lambda x, y: cosent((x * y).sum(-1), scores.to(x.device), tau), a.single, b.single, dims)


# ---- across ranks -------------------------------------------------------------------------------------------


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Gather(torch.autograd.Function):
    """Every rank's rows, concatenated in rank order (ranks may hold different row counts). The backward hands
    back this rank's rows of the gradient, unreduced: that is exact because every rank computes the same loss
    from the same gathered tensors, and the parameter gradients are then summed over ranks (sync_grads)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(size)]
        dist.all_gather(counts, torch.tensor([len(x)], device=x.device))
        counts = [int(c) for c in counts]
        pad = max(counts) - len(x)
        parts = [x.new_empty(max(counts), *x.shape[1:]) for _ in range(size)]
        dist.all_gather(parts, torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x.contiguous())
        ctx.start, ctx.n = sum(counts[:rank]), len(x)
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.start : ctx.start + ctx.n]


def gather(e: Embeddings) -> Embeddings:
    """Embeddings of all ranks (rank order), differentiable; unchanged with one process."""
    if world()[1] == 1:
        return e
    length = torch.tensor([e.multi.shape[1]], device=e.multi.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    e = e.padded(int(length))
    return Embeddings(_Gather.apply(e.single), _Gather.apply(e.multi), _Gather.apply(e.mask.to(torch.uint8)).bool())


def gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """A tensor without gradients (e.g. pair scores) from all ranks, in rank order."""
    return x if world()[1] == 1 else _Gather.apply(x.detach())


def sync_grads(params: Sequence[nn.Parameter]) -> None:
    """Sum the gradients over ranks (each rank holds its rows' share of the one loss's gradient)."""
    if world()[1] == 1:
        return
    params = [p for p in params if p.grad is not None]
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p.grad))


# ---- one step's gradients -----------------------------------------------------------------------------------


def backward(
    model: nn.Module,
    groups: Sequence[list[Item]],
    loss_fn: Callable[[list[Embeddings]], torch.Tensor],
    minibatch: int | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """Gradients of loss_fn(the groups' embeddings, gathered across ranks) into the trainable parameters;
    returns the loss (detached). groups: item lists (e.g. queries, positives, negatives), empty ones allowed;
    a None group gives loss_fn a None (it must be None on every rank).

    minibatch: GradCache. Embed the groups `minibatch` items at a time without a graph, take the loss and its
    gradient with respect to the embeddings of the whole batch, then embed each mini-batch again with a graph
    and backpropagate its cached gradient: activation memory is that of one mini-batch, whatever the batch.
    Each mini-batch's RNG state is replayed, so dropout draws the same masks in both passes."""
    if minibatch is None:
        embs = [None if g is None else gather(embed_items(model, g, deterministic)) for g in groups]
        loss = loss_fn(embs)
        loss.backward()
        return loss.detach()
    chunks = [None if g is None else [g[i : i + minibatch] for i in range(0, len(g), minibatch)] for g in groups]
    states, cached = [], []
    with torch.no_grad():
        for group in chunks:
            parts = []
            for c in group or []:
                states.append(_rng(model.device))
                parts.append(embed_items(model, c, deterministic))
            cached.append(None if group is None else Embeddings.cat(parts) if parts else embed_items(model, []))
    after = _rng(model.device)
    for e in cached:
        if e is not None:
            e.single.requires_grad_()
            e.multi.requires_grad_()
    loss = loss_fn([None if e is None else gather(e) for e in cached])
    loss.backward()
    k = 0
    for group, e in zip(chunks, cached):
        start = 0
        for c in group or []:
            _set_rng(model.device, states[k])
            k += 1
            part = embed_items(model, c, deterministic)
            rows, L = slice(start, start + len(c)), part.multi.shape[1]
            gs, gm = e.single.grad, e.multi.grad
            surrogate = sum(
                (t * g).sum()
                for t, g in (
                    (part.single, None if gs is None else gs[rows]),
                    (part.multi, None if gm is None else gm[rows, :L]),
                )
                if g is not None
            )
            if torch.is_tensor(surrogate):
                surrogate.backward()
            start += len(c)
    _set_rng(model.device, after)
    return loss.detach()


def _rng(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
