"""Each component against the transformers / peft function of the same purpose."""

import json
import types

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.models.qwen2_5_vl import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

from jina_v4.model.config import JinaV4Config
from jina_v4.model.layers import RMSNorm, attention
from jina_v4.model.lora import LoRALinear, active
from jina_v4.model.positions import Segments, apply_rope, mrope_cos_sin, rope_index
from jina_v4.model.processing import TaskRows
from jina_v4.model.text import DecoderLayer

from tolerances import FP32, call_error, max_diff, sum_rounding

pytestmark = pytest.mark.parity

torch.manual_seed(0)


def configs(checkpoints, name):
    d = json.loads((checkpoints[name] / "config.json").read_text())
    hf_cfg = Qwen2_5_VLConfig.from_dict(d, attn_implementation="sdpa").text_config
    hf_cfg._attn_implementation = "sdpa"
    return JinaV4Config.from_dict(d).text_config, hf_cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm(dtype):
    ours, theirs = RMSNorm(48, 1e-6), hf.Qwen2RMSNorm(48, 1e-6)
    w = 1 + 0.1 * torch.randn(48)
    ours.weight.data.copy_(w), theirs.weight.data.copy_(w)
    x = (3 * torch.randn(5, 7, 48)).to(dtype)
    assert torch.equal(ours.to(dtype)(x), theirs.to(dtype)(x))


def test_mrope_cos_sin(checkpoints, name):
    ours_cfg, hf_cfg = configs(checkpoints, name)
    pos = torch.randint(0, 5000, (3, 1, 37))  # distinct positions per axis
    cos, sin = hf.Qwen2_5_VLRotaryEmbedding(hf_cfg)(torch.zeros(1, dtype=torch.float32), pos)
    q, k = torch.randn(1, 3, 37, ours_cfg.head_dim), torch.randn(1, 3, 37, ours_cfg.head_dim)
    hq, hk = hf.apply_multimodal_rotary_pos_emb(q, k, cos, sin, hf_cfg.rope_scaling["mrope_section"])
    c, s = mrope_cos_sin(pos[:, 0], ours_cfg.head_dim, ours_cfg.rope_theta, ours_cfg.mrope_section, torch.float32)
    oq = apply_rope(q[0].transpose(0, 1), c, s).transpose(0, 1)
    ok = apply_rope(k[0].transpose(0, 1), c, s).transpose(0, 1)
    assert torch.equal(oq, hq[0]) and torch.equal(ok, hk[0])


def test_decoder_layer(checkpoints, name):
    ours_cfg, hf_cfg = configs(checkpoints, name)
    theirs = hf.Qwen2_5_VLDecoderLayer(hf_cfg, 0).eval()
    for p in theirs.parameters():
        p.data.normal_(0, 0.2)
    ours = DecoderLayer(ours_cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    lengths = [9, 4, 13]
    x = torch.randn(len(lengths), max(lengths), ours_cfg.hidden_size)
    pos = torch.arange(max(lengths)).expand(3, len(lengths), -1)
    cos, sin = hf.Qwen2_5_VLRotaryEmbedding(hf_cfg)(x, pos)
    with torch.no_grad():
        for b, n in enumerate(lengths):  # the reference, one unpadded sequence at a time
            expected = theirs(x[b : b + 1, :n], position_embeddings=(cos[:, b : b + 1, :n], sin[:, b : b + 1, :n]))[0][
                0
            ]
            packed = torch.cat([x[i, :m] for i, m in enumerate(lengths)])
            c, s = mrope_cos_sin(
                torch.cat([pos[:, i, :m] for i, m in enumerate(lengths)], 1),
                ours_cfg.head_dim,
                ours_cfg.rope_theta,
                ours_cfg.mrope_section,
                torch.float32,
            )
            cu = [0, 9, 13, 26]
            got = ours(packed, c, s, Segments(cu))[cu[b] : cu[b + 1]]
            assert max_diff(got, expected) <= FP32 * call_error(ours, packed, c, s, Segments(cu))


def test_lora_layer():
    base = torch.nn.Sequential(torch.nn.Linear(24, 40))
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=["0"])
    peft_model = get_peft_model(base, cfg, adapter_name="t1")
    peft_model.add_adapter("t2", cfg)
    for p in peft_model.parameters():
        p.data.normal_(0, 0.3)
    ours = LoRALinear(24, 40)
    ours.add_tasks(["t1", "t2"], 4)
    ours.scaling = 12 / 4
    layer = peft_model.base_model.model[0]
    ours.weight.data.copy_(layer.base_layer.weight), ours.bias.data.copy_(layer.base_layer.bias)
    for t in ("t1", "t2"):
        ours.lora_A[t].data.copy_(layer.lora_A[t].weight), ours.lora_B[t].data.copy_(layer.lora_B[t].weight)
    x = torch.randn(10, 24)
    peft_model.eval()
    with torch.no_grad():
        for t in ("t1", "t2"):
            peft_model.set_adapter(t)
            expected = peft_model(x)
            with active(t):
                # the low-rank term accumulates inside the GEMM (addmm) instead of a separate add: two
                # implementations (tolerances.py); merged, W + s·BA is one more fp32 rounding of each weight
                tol = FP32 * call_error(ours, x)
                assert max_diff(ours(x), expected) <= tol
                ours.merge(t)
                assert max_diff(ours(x), expected) <= tol
                ours.merge(None)
        rows = (torch.arange(10) % 2)[:, None] == torch.arange(2)  # even rows t1, odd rows t2
        with active(TaskRows(["t1", "t2"], rows.float())):
            mixed = ours(x)
        # masked rows get exactly 0 added, so each row equals the single-task result bit for bit
        with active("t1"):
            assert torch.equal(mixed[::2], ours(x)[::2])
        with active("t2"):
            assert torch.equal(mixed[1::2], ours(x)[1::2])
    with pytest.raises(ValueError, match="run it under lora.active"):
        ours(x)


def test_rope_index_text_with_padding(checkpoints):
    d = json.loads((checkpoints["gqa2-sharded"] / "config.json").read_text())
    model = types.SimpleNamespace(config=Qwen2_5_VLConfig.from_dict(d))
    lengths = [5, 1, 8]
    mask = (torch.arange(8) < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(0, 100, (3, 8))
    expected, _ = hf.Qwen2_5_VLModel.get_rope_index(model, ids, None, None, None, mask)
    for b, n in enumerate(lengths):
        got = rope_index(ids[b, :n].tolist(), [], image_token_id=-1, merge=2)
        assert torch.equal(got, expected[:, b, :n])


def test_packed_attention_matches_dense_masks():
    lengths = [3, 7, 1, 5]
    T, cu = sum(lengths), [0, 3, 10, 11, 16]
    q, k, v = torch.randn(T, 4, 8), torch.randn(T, 2, 8), torch.randn(T, 2, 8)
    seg = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    same = seg[:, None] == seg[None, :]
    for causal in (True, False):
        mask = same & (torch.ones(T, T).tril().bool() if causal else True)
        dense = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.repeat_interleave(2, 1).transpose(0, 1),
            v.repeat_interleave(2, 1).transpose(0, 1),
            attn_mask=mask,
        )
        tol = FP32 * call_error(attention, q, k, v, Segments(cu), causal)  # tolerances.py
        assert max_diff(attention(q, k, v, Segments(cu), causal), dense.transpose(0, 1)) <= tol


def test_rmsnorm_epsilon_at_small_magnitudes():
    """Where mean(x²) is near eps, eps decides the output: a wrong eps (1e-5 for 1e-6) is off by far more
    than any rounding."""
    theirs = hf.Qwen2RMSNorm(48, 1e-6)
    x = 1e-3 * torch.randn(5, 48)  # mean square ~1e-6
    assert torch.equal(RMSNorm(48, 1e-6)(x), theirs(x))
    assert (RMSNorm(48, 1e-5)(x) - theirs(x)).abs().max() > 1e4 * 1e-6 * theirs(x).abs().max()


def test_bf16_mean_pooling_accumulates_in_fp32():
    """4,000 bf16 token states pooled as the fp32 pooling of the same values (a bf16 running sum would drift
    by ~1e-3 relative: 8 bits of mantissa)."""
    from jina_v4.model.heads import mean_rows

    h = torch.randn(4000, 64).add_(0.5).to(torch.bfloat16)
    got = mean_rows(h, [range(4000)])[0]
    assert got.dtype == torch.float32
    exact = h.double().mean(0)
    # an fp32 running sum: its rounding's standard deviation from the data (tolerances.sum_rounding); 6 sigma
    fp32 = 6 * sum_rounding(h.float()) / 4000
    assert ((got - exact).abs() <= fp32).all()
    bf16 = h.sum(0, dtype=torch.bfloat16).double() / 4000  # the trap: a bf16 running sum is ~2^16 times off
    assert ((bf16 - exact).abs() > 100 * fp32).any()
