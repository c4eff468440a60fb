"""fp32 and bf16 tolerances from an error analysis, the same on every CPU (NOTES.md, "Tolerances").

The float64 identity (test_float64.py) shows that jina_v4 computes the reference's algorithm. What is left in
fp32 or bf16 is rounding, amplified by the checkpoint. This module measures that rounding without any fp32 or
bf16 kernel, so the bound it gives is the same on AVX2, AVX-512 and Arm:

fp32. One implementation's error is (a) storage: every intermediate result rounded to fp32, and (b)
accumulation: the rounding of the running sums inside matrix products and attention, in the kernel's order.
`NarrowStorage` runs a float64 copy of the model with both: every result rounded to fp32, and every product
accumulated one term at a time with each partial sum rounded (an FMA chain: the longest rounding walk any
summation order takes; blocked kernels keep several shorter ones). E = max |that run - the exact run| over a
checkpoint's probe outputs is one implementation's error, including the checkpoint's own amplification (a LoRA
scaling of 2.5, an RMSNorm where epsilon dominates). Two implementations are each about E from the exact
result, so they differ by at most about 2E where their errors line up (the triangle inequality), and the
largest difference over a test's outputs, another pattern of roundings, spreads by about 1.5x: FP32 = 3.

bf16. A bf16 run's error is its storage: products accumulate in fp32, whose rounding is 2^16 times smaller, and
the fp32 reference it is compared with is as exact. `ExactProducts` runs the bf16 model itself with every
product computed in float64 and rounded once to bf16 (its fp32 islands stay fp32): E = max |that - the exact
float64 run of the fp32 weights|. The two runs share every storage rounding; they differ where an fp32 sum
lands on the other side of a bf16 rounding boundary, which moves a value by one bf16 step: BF16 = 2.

float64 kernels differ between CPUs by ~1e-16, far below any E: E is the same on every CPU.
"""

from __future__ import annotations

import copy

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

FP32 = 3.0  # two fp32 implementations: 2E where their errors line up, x1.5 for the spread of a maximum
BF16 = 2.0  # bf16 against an fp32 or float64 result: E, x2 for a sum rounded across a bf16 boundary
SAME = 2.0  # one fp32 implementation in two batches (other row counts, other kernels): each within E of exact


# ---- the two emulations ---------------------------------------------------------------------------------------


class NarrowStorage(TorchDispatchMode):
    """float64 arithmetic with fp32 rounding, forward and backward: every float64 tensor an aten op creates or
    writes is rounded to fp32 (views are left alone: their data was rounded where it was made), matrix products
    accumulate term by term with each partial sum rounded, and softmax rounds its shifted scores, their
    exponentials, their running sum and the quotient. Attention runs as its textbook ops (`fp32_error` selects
    SDPA's math backend), so its products are matrix products here."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SEQUENTIAL:
            return SEQUENTIAL[func](*args, **kwargs)
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:  # the handler runs outside the mode: the decomposition re-enters it
                out = func.decompose(*args, **kwargs)  # linear, conv3d, attention: into the ops handled here
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        if func._schema.is_mutable:
            for a in args:
                if isinstance(a, torch.Tensor) and a.dtype == torch.float64:
                    a.copy_(a.float())
            return out
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        return tree_map(
            lambda t: _round(t) if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs else t,
            out,
        )


def _round(t: torch.Tensor) -> torch.Tensor:
    return t.float().double() if t.dtype == torch.float64 else t


class ExactProducts(TorchFunctionMode):
    """Matrix products and attention computed in float64 from their operands and rounded once to the operands'
    dtype; everything else as the model runs it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in PRODUCTS:
            return func(*args, **kwargs)
        wide_args, wide_kwargs = tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) else t, (args, kwargs))
        if func is torch.Tensor.addmm_:
            return args[0].copy_(torch.addmm(*wide_args, **wide_kwargs))
        return func(*wide_args, **wide_kwargs).to(args[0].dtype)


def _tensors(tree) -> list[torch.Tensor]:
    found = []
    tree_map(lambda t: found.append(t) if isinstance(t, torch.Tensor) else None, tree)
    return found


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (..., m, k) @ b (..., k, n), the k terms added in order and every partial sum rounded."""
    acc = _round(a.new_zeros(*a.shape[:-1], b.shape[-1]))
    for j in range(a.shape[-1]):
        acc = _round(torch.addcmul(acc, a[..., :, j, None], b[..., j, None, :]))
    return acc


def _addmm(bias, a, b, *, beta=1, alpha=1):
    return _round(beta * bias + _round(alpha * _mm(a, b)))


def _addmm_(y, a, b, *, beta=1, alpha=1):
    return y.copy_(_addmm(y, a, b, beta=beta, alpha=alpha))


def _convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    # the patch embedding: kernel == stride, one output per patch, i.e. a Linear over the flattened patch
    assert tuple(weight.shape[2:]) == tuple(x.shape[2:]) and bias is None and groups == 1
    return _mm(x.flatten(1), weight.flatten(1).T)[..., None, None, None]


def _softmax(x, dim, half_to_float=False):
    e = _round(torch.exp(_round(x - x.amax(dim, keepdim=True))))
    total = _round(e.select(dim, 0).clone())
    for j in range(1, e.shape[dim]):
        total = _round(total + e.select(dim, j))
    return _round(e / total.unsqueeze(dim))


def _safe_softmax(x, dim, dtype=None):
    out = _softmax(x, dim)
    return torch.where(torch.isinf(x).all(dim, keepdim=True), 0.0, out)


aten = torch.ops.aten
SEQUENTIAL = {
    aten.mm.default: _mm,
    aten.bmm.default: _mm,
    aten.addmm.default: _addmm,
    aten.addmm_.default: _addmm_,
    aten.convolution.default: _convolution,
    aten._softmax.default: _softmax,
    aten._safe_softmax.default: _safe_softmax,
}
# ExactProducts (bf16): the functions whose products it computes in float64
PRODUCTS = {
    torch.nn.functional.linear,
    torch.Tensor.addmm_,
    torch.nn.functional.conv3d,
    torch.nn.functional.scaled_dot_product_attention,
}


# ---- errors and bounds ----------------------------------------------------------------------------------------


def float64_copy(module):
    """A float64 copy of a module (a JinaV4 keeps its processor): its weights' values exactly as they are."""
    processor = getattr(module, "processor", None)
    if processor is not None:
        module.processor = None
    try:
        wide = copy.deepcopy(module).to(torch.float64)
    finally:
        if processor is not None:
            module.processor = processor
    if processor is not None:
        wide.processor = processor
    return wide


def fp32_error(module64, run) -> float:
    """E for fp32: the largest difference, over everything `run(module)` returns, between module64 run with fp32
    rounding (`NarrowStorage`) and run exactly."""
    with torch.no_grad():
        return max_diff(*fp32_runs(module64, run))


def fp32_runs(module64, run):
    """(run(module64) with fp32 rounding, run(module64)), autograd as the caller has it: gradients too."""
    with sdpa_kernel(SDPBackend.MATH):
        exact = run(module64)
        with NarrowStorage():
            narrow = run(module64)
    return narrow, exact


def call_error(fn, *args, **kwargs) -> float:
    """E for one fp32 call fn(*args): fn a module (run as a float64 copy) or a function, on float64 copies of
    the floating-point tensor arguments."""
    wide = float64_copy(fn) if isinstance(fn, torch.nn.Module) else fn
    args, kwargs = tree_map(
        lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, (args, kwargs)
    )
    return fp32_error(wide, lambda f: f(*args, **kwargs))


def sum_rounding(terms: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The standard deviation of the rounding error of summing `terms` along dim 0 one at a time in `dtype`:
    each partial sum s_j is rounded by a uniform error of at most u·|s_j|, so the total has variance
    u²/3 · Σ_j s_j² (u: the unit roundoff). Computed from the data, per column."""
    u = torch.finfo(dtype).eps / 2
    partial = terms.double().cumsum(0)
    return u * (partial.pow(2).sum(0) / 3).sqrt()


def bf16_error(module_bf16, module64, run) -> float:
    """E for bf16: `run` on the bf16 module with exact products (`ExactProducts`) against module64 run exactly."""
    return max_diff(*bf16_runs(module_bf16, module64, run))


def bf16_runs(module_bf16, module64, run):
    """(run(module_bf16) with exact products, run(module64)), without autograd."""
    with torch.no_grad():
        exact = run(module64)
        with ExactProducts():
            narrow = run(module_bf16)
    return narrow, exact


def max_diff(a, b) -> float:
    """The largest absolute difference between two tensors or two lists of tensors (compared in float64)."""
    a, b = _flat(a), _flat(b)
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    return max(
        (float((x.detach().double() - y.detach().double()).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0
    )


def _flat(x) -> list[torch.Tensor]:
    """The tensors of a tensor, or of lists, tuples and dicts of them (dicts: their values)."""
    return _tensors(x)


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Higham's γ_n = n·u / (1 - n·u): |fl(Σ of n products) - Σ| <= γ_n · Σ|products| for any summation order
    (u: the unit roundoff). A bound that holds on every CPU by theorem; for small, exactly specified sums."""
    u = torch.finfo(dtype).eps / 2
    return n * u / (1 - n * u)
