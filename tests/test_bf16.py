"""bf16 jina_v4 (all the speed paths: packed batches, fused LoRA, merged weights) against the fp32
reference stays within the bf16 tolerance of NOTES.md, the gates of scripts/parity.py."""

import pytest
import torch
import torch.nn.functional as F

from parity import THRESHOLDS
from test_images import picture, reference_image

GATE = THRESHOLDS["bfloat16"]
TEXTS = ["Overview of climate change impacts on coastal cities", "海滩上美丽的日落",
         "def hello_world():\n    print('Hello, World!')", "A long passage about the sea. " * 30]


@pytest.mark.parametrize("merged", [False, True])
def test_bf16_against_fp32_reference(name, checkpoints, references, merged):
    from jina_v4 import JinaV4

    model, ref = JinaV4.from_pretrained(checkpoints[name], device="cpu", dtype="bfloat16"), references(name)
    images = [picture(240, 320, 1), picture(100, 500, 2)]
    for task in ("retrieval", "text-matching", "code"):
        model.merge(task if merged else None)
        single = torch.cat([model.encode_text(TEXTS, task=task), model.encode_image(images, task=task)])
        expected = torch.cat([ref.encode_text([t], task)[0][None] for t in TEXTS] +
                             [reference_image(ref, model, img, task)[0][None] for img in images])
        assert F.cosine_similarity(single, expected).min() >= GATE["single"]
        multi = model.encode_text(TEXTS, task=task, return_multivector=True)
        multi += model.encode_image(images, task=task, return_multivector=True)
        expected = [ref.encode_text([t], task, multivector=True)[0] for t in TEXTS]
        expected += [reference_image(ref, model, img, task, multivector=True)[0] for img in images]
        for a, b in zip(multi, expected):
            cos = F.cosine_similarity(a, b, dim=-1)
            assert cos.mean() >= GATE["multi_mean"] and cos.min() >= GATE["multi_min"]
