"""A forward never waits on the device: once a batch is built, no tensor is read back to the host (no .item(),
.tolist(), int(), bool(), nonzero(), boolean-mask indexing, data-dependent shapes). Lengths and offsets come from
the batch's Python-side metadata. On a GPU each such call would stall the stream; here every tensor method
that would is counted (a TorchFunctionMode sees every call) during forwards of texts, images, mixed tasks and
both heads."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from jina_v4.execution import mode
from jina_v4.model.heads import Multi, Single
from jina_v4.model.layers import attention
from jina_v4.model.positions import Segments

from test_images import picture

READS = {
    "item",
    "tolist",
    "__int__",
    "__float__",
    "__bool__",
    "__index__",
    "nonzero",
    "argwhere",
    "masked_select",
    "unique",
    "unique_consecutive",
    "numpy",
}
INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_put"}


def has_bool_tensor(index) -> bool:
    if isinstance(index, torch.Tensor):
        return index.dtype == torch.bool
    return isinstance(index, (tuple, list)) and any(has_bool_tensor(i) for i in index)


class HostReads(TorchFunctionMode):
    """Every torch function and Tensor method called inside goes through here (nothing is patched): the ones
    that read a device tensor back to the host are recorded."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in READS:
            self.calls.append(name)
        elif name in INDEXING and len(args) > 1 and has_bool_tensor(args[1]):
            self.calls.append(f"{name} with a boolean mask")
        elif (
            name == "repeat_interleave"
            and isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor)
            and kwargs.get("output_size") is None
        ):
            self.calls.append("repeat_interleave without output_size")
        return func(*args, **kwargs)


@pytest.mark.parametrize("deterministic", [False, True])
def test_forward_reads_nothing_back(models, deterministic):
    model = models("mha-bf16")
    inputs = ["a short query", picture(240, 320, 1), "a longer passage " * 20, picture(100, 500, 2), "x"]
    items = model.prepare(inputs, ["code", "retrieval", "code", "text-matching", "code"])
    batch = model.processor.collate(items).to(model.device, model.dtype)
    with torch.inference_mode(), mode(deterministic=deterministic):
        with HostReads() as reads:
            h = model(batch)
            single = Single(8)(model, h, batch)
            multi = Multi()(model, h, batch)
    assert reads.calls == []
    assert len(single) == 5 and single[0].shape == (8,)
    assert [len(m) for m in multi] == batch.seqs.lengths and multi[0].shape[
        1
    ] == model.config.multi_vector_projector_dim


def test_the_counter_counts():
    x = torch.arange(6.0)
    with HostReads() as reads:
        x.sum().item(), x[x > 2], x.nonzero(), bool(x[0] == 0), torch.repeat_interleave(x, torch.ones(6, dtype=int))
        x[torch.tensor([1, 2])], int(x[1])
    assert reads.calls == [
        "item",
        "__getitem__ with a boolean mask",
        "nonzero",
        "__bool__",
        "repeat_interleave without output_size",
        "__int__",
    ]


def test_varlen_switch_falls_back_on_cpu():
    """`mode(attention="varlen")` asks for the varlen kernel where the device has it (CUDA, half precision); on a
    CPU the same call runs the per-length SDPA path and gives exactly its result."""
    q, k, v = torch.randn(20, 4, 8), torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    seqs = Segments([0, 7, 9, 20])
    plain = attention(q, k, v, seqs, causal=True)
    with mode(attention="varlen"):
        switched = attention(q, k, v, seqs, causal=True)
    assert torch.equal(plain, switched)


def test_model_varlen_switch_on_cpu(models):
    model = models("gqa2-sharded")
    texts = ["one", "two texts here", "and a third, longer one " * 5]
    plain = model.encode_text(texts, task="code", return_multivector=True)
    with mode(attention="varlen"):
        switched = model.encode_text(texts, task="code", return_multivector=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, switched))
