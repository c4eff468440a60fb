"""Where jina_v4's vision tower and the reference's (transformers 4.52.4) part ways in fp32, component by
component: each component of both towers gets the same input (the reference's), so each figure is that
component's own rounding, not an inherited one. A tower of the real width (1280 hidden, 16 heads x 80,
MLP 3420, merger to 2048) with random weights and `--depth` blocks, the last with full attention.

    python scripts/vision_parity.py --height 600 --width 800 --depth 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers.models.qwen2_5_vl import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

sys.path.insert(0, str(Path(__file__).parent))
from jina_v4.model.config import VisionConfig, parse  # noqa: E402
from jina_v4.model.images import smart_resize  # noqa: E402
from jina_v4.model.positions import VisionLayout, vision_cos_sin  # noqa: E402
from jina_v4.model.vision import VisionTower  # noqa: E402

from synthetic import RELEASED, randomize  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=600)
    ap.add_argument("--width", type=int, default=800)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    cfg = json.loads((RELEASED / "config.json").read_text())
    cfg["vision_config"].update(depth=args.depth, fullatt_block_indexes=[args.depth - 1])
    ours_cfg = parse(VisionConfig, cfg["vision_config"], "config.json")
    ref = hf.Qwen2_5_VisionTransformerPretrainedModel._from_config(
        Qwen2_5_VLConfig.from_dict(cfg).vision_config, attn_implementation="sdpa", torch_dtype=torch.float32
    ).eval()
    randomize(ref, args.seed)
    ours = VisionTower(ours_cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)

    h, w = smart_resize(args.height, args.width, 28, 3136, 602112)
    grid = (1, h // 14, w // 14)
    pixels = torch.randn(grid[1] * grid[2], 1176)
    layout = VisionLayout([grid], 4, 2)
    inputs: dict[str, tuple] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, a, kw, out, name=name: inputs.__setitem__(name, (a, kw, out)), with_kwargs=True
        )
        for name, m in ref.named_modules()
        if name == "patch_embed"
        or name == "merger"
        or (
            name.startswith("blocks.")
            and name.count(".") in (1, 2)
            and name.rsplit(".", 1)[-1]
            in (
                "attn",
                "mlp",
            )
            + tuple(str(i) for i in range(args.depth))
        )
    ]
    rows = []
    with torch.no_grad():
        expected = ref(pixels, torch.tensor([grid]))
        got = ours(pixels, layout)
        for hook in hooks:
            hook.remove()
        (x,), _, out = inputs["patch_embed"]
        rows.append(("patch embedding (Conv3d, same call)", rel(ours.patch_embed(x), out)))
        theta = ref.rot_pos_emb(torch.tensor([grid]))
        emb = torch.cat((theta, theta), -1)
        cos, sin = vision_cos_sin(layout.positions, ours_cfg.head_dim, torch.float32)
        rows.append(("rotary cos/sin", max(rel(cos, emb.cos()), rel(sin, emb.sin()))))
        index = layout.index
        unit = 4
        cos_w = cos.view(-1, unit, cos.shape[-1])[index].view(cos.shape)
        sin_w = sin.view(-1, unit, sin.shape[-1])[index].view(sin.shape)
        for i in range(args.depth):
            kind = "full" if i == args.depth - 1 else "window"
            seqs = layout.images if kind == "full" else layout.windows
            a, kw, out = inputs[f"blocks.{i}.attn"]
            mine = ours.blocks[i].attn(a[0], cos_w, sin_w, seqs)
            rows.append(
                (
                    f"block {i} attention ({kind}: per-{'image' if kind == 'full' else 'window'} SDPA vs one "
                    "masked SDPA)",
                    rel(mine, out),
                )
            )
            a, _, out = inputs[f"blocks.{i}.mlp"]
            rows.append((f"block {i} MLP", rel(ours.blocks[i].mlp(a[0]), out)))
        a, _, out = inputs["merger"]
        rows.append(("patch merger", rel(ours.merger(a[0]), out)))
        rows.append(("whole tower (rounding accumulated)", rel(got, expected)))
    print(
        f"image {args.height}x{args.width} -> {h}x{w} px, {pixels.shape[0]} patches, "
        f"{len(layout.windows.lengths)} windows, {args.depth} blocks (the last full attention)"
    )
    print(f"{'component (same input for both)':<64} {'max |diff| / max |ref|':>22}")
    for name, r in rows:
        print(f"{name:<64} {r:>22.1e}")


if __name__ == "__main__":
    main()
