"""Reference outputs for the real model: run the reference and jina_v4 on a fixed probe set (the announcement's
multilingual sentences, code, generated images of several sizes), for all tasks, single and multi-vector, and
print one table. Exit status 1 when any output misses its threshold.

    python scripts/parity.py --model jinaai/jina-embeddings-v4 --device cuda --dtype bfloat16
    python scripts/parity.py --model ... --save ref.safetensors       # keep the reference outputs and inputs
    python scripts/parity.py --model ... --against ref.safetensors    # compare to them; needs no transformers
    python scripts/parity.py --model ... --dtype bfloat16 --reference-dtype float32   # bf16 against fp32

The reference is transformers + peft from the same files (scripts/reference.py: half precision runs under
autocast, as the released encode_* does), or with --remote-code the released remote code itself.

Stage files (jina_v4/apps/stages.py): every stage of one forward pass, from token ids to multi-vectors, with the
first stage out of the dtype's tolerance named; exit status 1 when any stage is out.

    python scripts/parity.py --stages --model DIR --dtype float32 --save ours.safetensors   # jina_v4's stages
    python scripts/reference.py --model DIR --dtype float32 -o ref.safetensors             # the reference's
    python scripts/parity.py --stages --model DIR --dtype bfloat16 --against ref.safetensors
    python scripts/parity.py --stages-a port.safetensors --stages-b ref.safetensors        # any two files
    python scripts/parity.py --stages --model DIR                  # jina_v4 against the reference, both run now
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

# (prompt_name, text): the model card's and announcement's examples, in several languages, and code.
TEXTS = [
    ("query", "Overview of climate change impacts on coastal cities"),
    (
        "passage",
        "The impacts of climate change on coastal cities are significant, from rising sea levels and "
        "stronger storm surges to saltwater intrusion into freshwater supplies.",
    ),
    ("passage", "A beautiful sunset over the beach"),
    ("passage", "Un beau coucher de soleil sur la plage"),
    ("passage", "海滩上美丽的日落"),
    ("passage", "浜辺に沈む美しい夕日"),
    ("query", "تأثير تغير المناخ على المدن الساحلية"),
    ("query", "Auswirkungen des Klimawandels auf Küstenstädte"),
    ("query", "Find a function that prints a greeting message to the console"),
    ("passage", "def hello_world():\n    print('Hello, World!')"),
    ("passage", "fn fib(n: u64) -> u64 {\n    if n < 2 { n } else { fib(n - 1) + fib(n - 2) }\n}"),
]
IMAGE_SIZES = [(224, 224), (240, 320), (600, 800), (1200, 900), (56, 400)]  # (height, width)
TASKS = ["retrieval", "text-matching", "code"]
# Per dtype: single vectors need cosine >= single; multi-vectors a mean per-token cosine >= multi_mean and a
# worst token >= multi_min; max_abs bounds the largest element difference (None: reported, not gated).
THRESHOLDS = {
    "float32": {"single": 0.99999, "multi_mean": 0.99999, "multi_min": 0.9999, "max_abs": 1e-3},
    "bfloat16": {"single": 0.999, "multi_mean": 0.995, "multi_min": 0.95, "max_abs": None},
    "float16": {"single": 0.999, "multi_mean": 0.995, "multi_min": 0.95, "max_abs": None},
}


def probe_images(sizes: list[tuple[int, int]] = IMAGE_SIZES) -> list[Image.Image]:
    """Deterministic synthetic pages of these (height, width): a gradient, noise, boxes and lines of 'text'."""
    images = []
    for i, (h, w) in enumerate(sizes):
        rng = np.random.default_rng(i)
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 200 / w + 30, y * 180 / h + 40, (x + y) * 100 / (h + w) + 90], -1)
        img = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
            x1, y1 = x0 + int(rng.integers(4, max(5, w // 3))), y0 + int(rng.integers(4, max(5, h // 3)))
            draw.rectangle([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        for row in range(8, h - 8, 18):
            draw.text((8, row), f"line {row} of page {i}: climate, coasts, code", fill=(10, 10, 10))
        images.append(img)
    return images


def key(task: str, kind: str, i: int, head: str) -> str:
    return f"{task}/{kind}/{i}/{head}"


def run_jina_v4(model_id, device, dtype, texts, images) -> dict[str, torch.Tensor]:
    from jina_v4 import JinaV4

    model = JinaV4.from_pretrained(model_id, device=device, dtype=dtype)
    out = {}
    for task in TASKS:
        for head, multi in (("single", False), ("multi", True)):
            for i, (prompt, text) in enumerate(texts):
                out[key(task, "text", i, head)] = model.encode_text(
                    text, task=task, prompt_name=prompt, return_multivector=multi
                )
            for i, v in enumerate(model.encode_image(images, task=task, return_multivector=multi)):
                out[key(task, "image", i, head)] = v
    return out


def run_reference(model_id, device, dtype, texts, images, remote_code: bool) -> dict[str, torch.Tensor]:
    out = {}
    if remote_code:  # the released modeling code from the hub, through transformers' AutoModel
        from transformers import AutoModel

        model = AutoModel.from_pretrained(model_id, trust_remote_code=True, torch_dtype=dtype).to(device).eval()
        for task in TASKS:
            for head, multi in (("single", False), ("multi", True)):
                for i, (prompt, text) in enumerate(texts):
                    v = model.encode_text([text], task=task, prompt_name=prompt, return_multivector=multi)[0]
                    out[key(task, "text", i, head)] = v.float().cpu()
                for i, img in enumerate(images):
                    v = model.encode_image([img], task=task, return_multivector=multi)[0]
                    out[key(task, "image", i, head)] = v.float().cpu()
        return out
    sys.path.insert(0, str(Path(__file__).parent))
    from jina_v4.model.config import PreprocessorConfig, read_json
    from jina_v4.model.images import image_patches, load_image
    from jina_v4.model.loading import resolve

    from reference import Reference

    path = resolve(model_id)
    ref = Reference(path, dtype, device)
    image_cfg = PreprocessorConfig.from_dict(read_json(path / "preprocessor_config.json"))
    patches = [image_patches(load_image(img), image_cfg) for img in images]  # = the released fast processor
    for task in TASKS:
        for head, multi in (("single", False), ("multi", True)):
            for i, (prompt, text) in enumerate(texts):
                out[key(task, "text", i, head)] = ref.encode_text([text], task, prompt, multivector=multi)[0]
            for i, (pixels, grid) in enumerate(patches):
                out[key(task, "image", i, head)] = ref.encode_image(pixels, grid, task, multivector=multi)[0]
    return out


def compare(ours: dict, ref: dict, dtype: str) -> bool:
    t = THRESHOLDS[dtype]
    rows, ok_all = [], True
    for k in ref:
        a, b = ours[k].float(), ref[k].float()
        task, kind, i, head = k.split("/")
        if a.shape != b.shape:
            rows.append((k, "shape", f"{tuple(a.shape)} vs {tuple(b.shape)}", "", "", False))
            ok_all = False
            continue
        diff = (a - b).abs().max().item()
        if head == "single":
            cos = F.cosine_similarity(a, b, dim=0).item()
            ok, shown, worst = cos >= t["single"], f"{cos:.6f}", ""
        else:
            cos = F.cosine_similarity(a, b, dim=-1)
            ok = cos.mean().item() >= t["multi_mean"] and cos.min().item() >= t["multi_min"]
            shown, worst = f"{cos.mean().item():.6f}", f"{cos.min().item():.6f}"
        ok = ok and (t["max_abs"] is None or diff <= t["max_abs"])
        ok_all &= ok
        rows.append((k, head, shown, worst, f"{diff:.2e}", ok))
    print(f"{'output':<30} {'head':<6} {'cosine':>9} {'worst tok':>9} {'max abs':>9}  result")
    for k, head, cos, worst, diff, ok in rows:
        print(f"{k:<30} {head:<6} {cos:>9} {worst:>9} {diff:>9}  {'pass' if ok else 'FAIL'}")
    gates = ", ".join(f"{n} {v}" for n, v in t.items() if v is not None)
    print(f"{sum(r[-1] for r in rows)}/{len(rows)} outputs pass ({dtype}: {gates})")
    return ok_all


def save(path: str, ref: dict, texts, images, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"output/{k}": v.contiguous() for k, v in ref.items()}
    tensors.update({f"input/image/{i}": torch.from_numpy(np.array(img)) for i, img in enumerate(images)})
    save_file(tensors, path, metadata={"texts": json.dumps(texts, ensure_ascii=False), **meta})


def load(path: str):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    texts = [tuple(t) for t in json.loads(meta["texts"])]
    n_images = sum(k.startswith("input/image/") for k in tensors)
    images = [Image.fromarray(tensors[f"input/image/{i}"].numpy()) for i in range(n_images)]
    ref = {k[len("output/") :]: v for k, v in tensors.items() if k.startswith("output/")}
    return ref, texts, images, meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="jinaai/jina-embeddings-v4", help="hub repo id or checkpoint directory")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(THRESHOLDS), help="default bfloat16, or the --against file's")
    ap.add_argument(
        "--reference-dtype",
        choices=sorted(THRESHOLDS),
        help="run the reference in another dtype, e.g. bf16 jina_v4 against an fp32 reference",
    )
    ap.add_argument("--remote-code", action="store_true", help="reference = the released remote code")
    ap.add_argument("--save", help="write the reference outputs and their inputs to this .safetensors file")
    ap.add_argument("--against", help="compare jina_v4 to a file written by --save (no transformers needed)")
    ap.add_argument("--stages", action="store_true", help="record and compare every stage (stage files)")
    ap.add_argument("--stages-a", metavar="A", help="compare two stage files: A (under test) ...")
    ap.add_argument("--stages-b", metavar="B", help="... against B (the reference side)")
    ap.add_argument(
        "--tolerance",
        choices=["float64", "float32", "float16", "bfloat16"],
        help="stage files: judge by this dtype's tolerance (default: the coarser of the two files' dtypes)",
    )
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    if args.stages or args.stages_a or args.stages_b:
        return stages_main(args)
    if args.against:
        ref, texts, images, meta = load(args.against)
        print(f"reference: {args.against} ({meta.get('reference')}, {meta.get('dtype')} on {meta.get('device')})")
        args.dtype = args.dtype or meta["dtype"]
        threshold_dtype = max(args.dtype, meta["dtype"], key=lambda d: THRESHOLDS[d]["multi_min"] < 0.99)
    else:
        args.dtype = args.dtype or "bfloat16"
        texts, images = TEXTS, probe_images()
        ref_dtype = args.reference_dtype or args.dtype
        ref = run_reference(args.model, args.device, getattr(torch, ref_dtype), texts, images, args.remote_code)
        meta = {
            "model": str(args.model),
            "dtype": ref_dtype,
            "device": args.device,
            "reference": "remote code" if args.remote_code else "transformers 4.52.4 + peft 0.15.2",
            "torch": torch.__version__,
        }
        if args.save:
            save(args.save, ref, texts, images, meta)
            print(f"saved {len(ref)} reference outputs and their inputs to {args.save}")
        threshold_dtype = max(args.dtype, ref_dtype, key=lambda d: THRESHOLDS[d]["multi_min"] < 0.99)
    ours = run_jina_v4(args.model, args.device, getattr(torch, args.dtype), texts, images)
    return 0 if compare(ours, ref, threshold_dtype) else 1


def stages_main(args) -> int:
    """--stages, --stages-a/--stages-b: stage files recorded, saved and compared (jina_v4/apps/stages.py)."""
    from jina_v4.apps import stages

    if args.stages_a or args.stages_b:
        if not (args.stages_a and args.stages_b):
            print("parity.py: --stages-a and --stages-b go together", file=sys.stderr)
            return 2
        a, meta_a = stages.load(args.stages_a)
        b, meta_b = stages.load(args.stages_b)
        report = stages.compare(a, meta_a, b, meta_b, args.tolerance)
        print(stages.format_report(report, describe(args.stages_a, meta_a), describe(args.stages_b, meta_b)))
        return 0 if report.ok else 1
    from jina_v4 import JinaV4
    from jina_v4.model.loading import resolve

    path = resolve(args.model)
    if args.against:
        b, meta_b = stages.load(args.against)
        cases = stages.cases_from(b, meta_b)
        args.dtype = args.dtype or meta_b["dtype"]
    else:
        cases, b, meta_b = stages.probe_cases(), None, None
        args.dtype = args.dtype or "bfloat16"
    model = JinaV4.from_pretrained(path, device=args.device, dtype=args.dtype)
    a, meta_a = stages.record_model(model, args.model, path, cases)
    if args.save:
        stages.save(args.save, a, meta_a)
        print(f"saved jina_v4's stages ({len(a)} tensors, {len(cases)} cases, {args.dtype}) to {args.save}")
        if not args.against:
            return 0
    if b is None:  # the reference, run now
        sys.path.insert(0, str(Path(__file__).parent))
        from reference import Reference

        ref_dtype = args.reference_dtype or args.dtype
        ref = Reference(path, getattr(torch, ref_dtype), args.device)
        b = ref.stages(cases)
        meta_b = stages.header(args.model, path, ref_dtype, args.device, cases, "reference (scripts/reference.py)", {})
    report = stages.compare(a, meta_a, b, meta_b, args.tolerance)
    name_b = describe(args.against, meta_b) if args.against else f"the reference ({meta_b['dtype']})"
    print(stages.format_report(report, f"jina_v4 ({args.dtype})", name_b))
    return 0 if report.ok else 1


def describe(path: str, meta: dict) -> str:
    return f"{path} ({meta.get('implementation', '?')}, {meta.get('dtype')} on {meta.get('device')})"


if __name__ == "__main__":
    sys.exit(main())
