"""float64 end to end: the proof that every component is the reference's algorithm. Both sides run in float64,
the reference with its fp32 islands (RMSNorm, both rotaries, inv_freq) lifted to float64 too (oracle64.py), so
what is left is float64 rounding: ~1e-15 against a 1e-12 bound. Any different algorithm (a wrong epsilon, a
rotary section swapped, a window in another order, a LoRA scaled differently) shows up orders of magnitude
above it. Text and images, single and multi-vectors, all three tasks, batched and mixed on jina_v4's side."""

import pytest
import torch

from jina_v4 import JinaV4

from oracle64 import float64_islands
from test_images import picture, reference_image

pytestmark = pytest.mark.parity

TOL = 1e-12
TEXTS = [
    "hello",
    "Overview of climate change impacts on coastal cities",
    "気候変動が沿岸都市に与える影響",
    "def add(a, b):\n    return a + b\n" * 4,
    "A long passage. " * 40,
]
IMAGES = [(240, 320), (100, 500), (56, 56), (450, 380)]


@pytest.fixture(scope="module")
def pair(checkpoints, reference_checkpoints):
    from reference import Reference

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = (
                JinaV4.from_pretrained(checkpoints[name], device="cpu", dtype="float64"),
                Reference(reference_checkpoints[name], dtype=torch.float64),
            )
        return cache[name]

    return get


def reference_outputs(ref, model, inputs, task, multivector):
    with float64_islands():
        return [
            ref.encode_text([x], task, "passage", multivector=multivector)[0]
            if isinstance(x, str)
            else reference_image(ref, model, x, task, multivector=multivector)[0]
            for x in inputs
        ]


@pytest.mark.parametrize("task", ["retrieval", "text-matching", "code"])
def test_float64_identity(name, pair, task):
    model, ref = pair(name)
    inputs = TEXTS + [picture(h, w, seed=i, noise=12) for i, (h, w) in enumerate(IMAGES)]
    for multivector in (False, True):
        got = model.encode(inputs, task=task, prompt_name="passage", return_multivector=multivector)
        expected = reference_outputs(ref, model, inputs, task, multivector)
        for g, e in zip(got, expected):
            assert g.dtype == e.dtype == torch.float64 and g.shape == e.shape
            assert (g - e).abs().max() <= TOL


def test_float64_mixed_tasks_and_matryoshka(pair):
    model, ref = pair("mha-bf16")
    inputs = [TEXTS[1], picture(240, 320, 1), TEXTS[4], picture(100, 500, 2)]
    tasks = ["code", "retrieval", "text-matching", "code"]
    got = model.encode(inputs, task=tasks, prompt_name="passage", truncate_dim=16)
    with float64_islands():
        for g, x, t in zip(got, inputs, tasks):
            e = (
                ref.encode_text([x], t, "passage", truncate_dim=16)
                if isinstance(x, str)
                else reference_image(ref, model, x, t, truncate_dim=16)
            )[0]
            assert (g - e).abs().max() <= TOL


def test_the_islands_matter(pair):
    """Without lifting the reference's fp32 islands the same comparison misses the bound by far: the test sees
    fp32 rounding, so it would see a different algorithm."""
    model, ref = pair("gqa2-sharded")
    got = model.encode_text(TEXTS, task="retrieval", prompt_name="passage")
    plain = torch.cat([ref.encode_text([x], "retrieval", "passage") for x in TEXTS])
    assert (got - plain).abs().max() > 1e3 * TOL
