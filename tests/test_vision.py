"""The vision tower's components one by one against transformers 4.52.4's modules of the same purpose, with the
same weights: one VisionBlock (window and full attention), the PatchMerger, and the whole tower on packed
images whose windows run in both directions, with the full-attention blocks placed first, between and last.
(The window permutation itself: tests/test_images.py::test_window_index_and_seqlens.)"""

import json

import pytest
import torch
from transformers.models.qwen2_5_vl import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

from jina_v4.model.config import VisionConfig, parse
from jina_v4.model.positions import Segments, VisionLayout, vision_cos_sin
from jina_v4.model.vision import PatchMerger, VisionBlock, VisionTower

from synthetic import RELEASED
from tolerances import FP32, call_error, max_diff

pytestmark = pytest.mark.parity

GRIDS = [(1, 24, 40), (1, 10, 6), (1, 16, 16)]  # merged 12x20 (3x5 windows, partial), 5x3, 4x4


def vision_config(depth=3, fullatt=(1,), hidden=32, heads=2):
    d = json.loads((RELEASED / "config.json").read_text())
    d["vision_config"].update(
        depth=depth,
        hidden_size=hidden,
        num_heads=heads,
        intermediate_size=48,
        out_hidden_size=40,
        fullatt_block_indexes=list(fullatt),
    )
    return parse(VisionConfig, d["vision_config"], "config.json"), Qwen2_5_VLConfig.from_dict(d).vision_config


def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 5) + (p.dim() == 1))
    return module


@pytest.mark.parametrize("full", [False, True])
def test_vision_block(full):
    ours_cfg, hf_cfg = vision_config()
    theirs = randomize(hf.Qwen2_5_VLVisionBlock(hf_cfg, "sdpa")).eval()
    ours = VisionBlock(ours_cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    layout = VisionLayout(GRIDS, 4, 2)
    seqs = layout.images if full else layout.windows
    x = torch.randn(len(layout.positions), ours_cfg.hidden_size)
    cos, sin = vision_cos_sin(layout.positions, ours_cfg.head_dim, torch.float32)
    with torch.no_grad():
        expected = theirs(x, cu_seqlens=torch.tensor(seqs.cu, dtype=torch.int32), position_embeddings=(cos, sin))
        got = ours(x, cos, sin, seqs)
    assert max_diff(got, expected) <= FP32 * call_error(ours, x, cos, sin, seqs)  # tolerances.py


def test_patch_merger():
    ours_cfg, hf_cfg = vision_config()
    theirs = randomize(hf.Qwen2_5_VLPatchMerger(hf_cfg.out_hidden_size, hf_cfg.hidden_size, 2)).eval()
    ours = PatchMerger(ours_cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(64, ours_cfg.hidden_size)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("fullatt", [(0,), (1,), (2,), ()])
def test_vision_tower(fullatt):
    ours_cfg, hf_cfg = vision_config(fullatt=fullatt)
    theirs = randomize(
        hf.Qwen2_5_VisionTransformerPretrainedModel._from_config(
            hf_cfg, attn_implementation="sdpa", torch_dtype=torch.float32
        )
    )
    ours = VisionTower(ours_cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    pixels = torch.randn(sum(t * h * w for t, h, w in GRIDS), 3 * 2 * 14 * 14)
    with torch.no_grad():
        expected = theirs.eval()(pixels, torch.tensor(GRIDS))
        got = ours(pixels, VisionLayout(GRIDS, 4, 2))
    assert got.shape == expected.shape == (pixels.shape[0] // 4, 40)
    tol = FP32 * call_error(ours, pixels, VisionLayout(GRIDS, 4, 2))  # tolerances.py
    assert max_diff(got, expected) <= tol
    # the window order matters here: windows tiled column-first give another result
    transposed = VisionLayout([(t, w, h) for t, h, w in GRIDS], 4, 2)
    transposed.positions = VisionLayout(GRIDS, 4, 2).positions
    with torch.no_grad():
        wrong = ours(pixels, transposed)
    assert max_diff(wrong, expected) > 100 * tol


def test_segments():
    s = Segments([0, 3, 6, 6, 10])
    assert s.lengths == [3, 3, 0, 4] and s.max_len == 4 and s.runs == [[0, 2, 3], [6, 1, 0], [6, 1, 4]]
    assert s.slots.tolist() == [0, 1, 2, 4, 5, 6, 12, 13, 14, 15]


@pytest.mark.parametrize("full", [False, True])
def test_bf16_vision_rotary_is_the_references(full):
    """A bf16 tower: q and k reach attention rotated as the reference rotates them (in fp32, cast back to bf16),
    bit for bit, given the same projections. Rotating in bf16 instead moves them by a bf16 step or more, and
    through the blocks after, by far more than the 1-2 steps that two bf16 attention kernels differ by."""
    from jina_v4.execution import mode

    ours_cfg, hf_cfg = vision_config()
    block = VisionBlock(ours_cfg)
    randomize(block)
    block = block.to(torch.bfloat16)
    layout = VisionLayout(GRIDS, 4, 2)
    x = torch.randn(len(layout.positions), ours_cfg.hidden_size).to(torch.bfloat16)
    cos, sin = vision_cos_sin(layout.positions, ours_cfg.head_dim, torch.bfloat16)
    assert cos.dtype == torch.float32  # the tables stay fp32 for a bf16 tower, as the reference's
    seen = {}

    def record(q, k, v, seqs, causal):
        seen.update(q=q, k=k)
        return v

    with torch.no_grad(), mode(attention=record):  # an attention kernel that records what it is given
        block(x, cos, sin, layout.images if full else layout.windows)
        q, k, _ = block.attn.qkv(block.norm1(x)).view(len(x), 3, ours_cfg.num_heads, -1).unbind(1)
        eq, ek = hf.apply_rotary_pos_emb_vision(q, k, cos, sin)
    assert seen["q"].dtype == torch.bfloat16 and torch.equal(seen["q"], eq) and torch.equal(seen["k"], ek)
