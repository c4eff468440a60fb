"""bf16 jina_v4 (all the speed paths: packed batches, fused LoRA, merged weights) against the fp32 reference:
within BF16 x E, E the emulated bf16 error of the checkpoint (tolerances.py), and within the cosine gates that
scripts/parity.py applies to the real model. The bf16 vision tower against the reference's, both in bf16."""

import pytest
import torch
import torch.nn.functional as F

from parity import THRESHOLDS
from test_images import picture, reference_image
from tolerances import BF16, SAME, max_diff

pytestmark = pytest.mark.parity

GATE = THRESHOLDS["bfloat16"]
TEXTS = [
    "Overview of climate change impacts on coastal cities",
    "海滩上美丽的日落",
    "def hello_world():\n    print('Hello, World!')",
    "A long passage about the sea. " * 30,
]


@pytest.mark.parametrize("merged", [False, True])
def test_bf16_against_fp32_reference(name, models, references, bf16_rounding, merged):
    model, ref = models(name, "bfloat16"), references(name)
    images = [picture(240, 320, 1), picture(100, 500, 2)]
    for task in ("retrieval", "text-matching", "code"):

        def run(m, multi=False):
            return list(m.encode_text(TEXTS, task=task, return_multivector=multi)) + list(
                m.encode_image(images, task=task, return_multivector=multi)
            )

        # merged weights round W + s·BA once more in bf16: a second run within BF16 x E of the exact result
        factor = BF16 * (SAME if merged else 1)
        model.merge(task if merged else None)
        try:
            single, multi = torch.stack(run(model)), run(model, True)
        finally:
            model.merge(None)
        expected = torch.cat(
            [ref.encode_text([t], task)[0][None] for t in TEXTS]
            + [reference_image(ref, model, img, task)[0][None] for img in images]
        )
        assert max_diff(single, expected) <= factor * bf16_rounding(name, "text", "image", run=run)
        assert F.cosine_similarity(single, expected).min() >= GATE["single"]
        expected = [ref.encode_text([t], task, multivector=True)[0] for t in TEXTS]
        expected += [reference_image(ref, model, img, task, multivector=True)[0] for img in images]
        bound = factor * bf16_rounding(name, "text-multi", "image-multi", run=lambda m: run(m, True))
        assert max_diff(multi, expected) <= bound
        for a, b in zip(multi, expected):
            cos = F.cosine_similarity(a, b, dim=-1)
            assert cos.mean() >= GATE["multi_mean"] and cos.min() >= GATE["multi_min"]
