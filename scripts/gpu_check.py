r"""jina_v4 at full size on one GPU, in one command: bf16 parity against the fp32 reference, speed against the
reference, both attention paths and deterministic mode; one JSON file and one printed table.

Phases, in order (each writes its part of the JSON when it ends; an error is recorded and the next one runs; a
phase that would start after --budget seconds is skipped):

  checkpoint     the released layout at full size (36 layers, hidden 2048, the 32-block vision tower, LoRA r=32
                 for 3 tasks, the real vocabulary with a byte-level tokenizer), random bf16 weights scaled so that
                 activations stay in range (`scaled_init`), written tensor by tensor once and then reused
  activations    the residual stream's RMS layer by layer, the final states' RMS and largest value, non-finite
  parity         jina_v4 bf16 (padded and varlen attention) and fp32 against the reference in fp32 on the same
                 device: texts of 8 to 8,000 tokens, pages up to 2 megapixels, 3 tasks, single and multi-vectors
  flops          bare bf16 matmuls (the decoder's Linear shapes; one square product) and the decoder forward on
                 one packed batch (scripts/bench.py's flop_ratio)
  speed          text tokens/s on short queries mixed with long passages, pages/s, peak memory, the text FLOP/s
                 over the bare matmul rate: jina_v4 padded and varlen, and the reference as the released
                 encode_* runs it (batches of 8 in input order, padded, bf16 autocast, without the LM head)
  deterministic  deterministic=True (and the default) on a few inputs: bit-identical across batch compositions?

The reference is scripts/reference.py (transformers 4.52.4 or 5.x, + peft); without it, parity compares bf16 to
jina_v4's own fp32 and speed has no reference column. `--tiny --device cpu` runs the same code on a tiny
checkpoint in seconds (tests/test_gpu_check.py); on a CPU the run first prints the CPU's capability and whether it
multiplies bf16 natively, and where bf16 is emulated the speed rows say so. From the repository root:

    PYTHONPATH=. python3 scripts/gpu_check.py --device cuda --out gpu_check.json

On a machine without network access, with the pinned reference (transformers 4.52.4, peft 0.15.2) carried as
wheels in .whl/ (NOTES.md, "Running on a GPU", says how to fetch them): the full check on the installed
transformers, then a second parity pass on the pinned one (NOTES.md has it as one 534-character line):

    set -o pipefail; export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD; OUT=${OUT:-$PWD}; nvidia-smi -L; \
    timeout 480 python3 scripts/gpu_check.py --device cuda --out $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log; \
    ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:$PWD timeout 100 python3 scripts/gpu_check.py \
    --device cuda --phases parity --budget 60 --out $OUT/gpu_check_pinned.json 2>&1 | tee $OUT/gpu_check_pinned.log
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from jina_v4 import JinaV4, execution  # noqa: E402
from jina_v4.model.loading import native_bf16  # noqa: E402

from bench import decoder_flops, flop_ratio, measure, reference_images, reference_texts, texts_of, write_random  # noqa: E402
from parity import THRESHOLDS, probe_images  # noqa: E402
from synthetic import RELEASED, Tiny, build_tokenizer, model_config  # noqa: E402

TASKS = ["retrieval", "text-matching", "code"]
GOALS = {"single": 0.9999, "token": 0.999, "flop_fraction": 0.5}  # bf16 against the fp32 reference; text FLOP/s
INIT = "scaled-v1"  # the name of `scaled_init`'s rules, kept with the checkpoint: another rule means another file
LORA_B = 0.25  # B·A·x is about a quarter of x: the adapters move the outputs visibly, as trained ones do
TINY = Tiny("gpu-check-tiny", vocab=151936, dtype="bfloat16")  # the real (byte-level) vocabulary, tiny widths
PHASES = ["checkpoint", "activations", "parity", "flops", "speed", "deterministic"]
# Size options: (the full-size default, the --tiny default); an option given on the command line wins.
SIZES = {
    "probe_tokens": ([8, 32, 128, 512, 2048, 8000], [8, 40, 300]),
    "probe_pages": (["280x224", "1100x850", "1754x1240", "480x1600"], ["224x224", "140x420"]),
    "max_pixels": (2_000_000, 2_000_000),
    "queries": (384, 16),
    "query_tokens": ([8, 64], [8, 40]),
    "passages": (48, 3),
    "passage_tokens": ([256, 4096], [100, 400]),
    "pages": (16, 2),
    "page_megapixels": (1.0, 0.05),
    "runs": (3, 1),
    "ref_runs": (2, 1),
    "flop_tokens": (16384, 256),
    "matmul": (8192, 256),
    "det_tokens": ([20, 300, 1500], [12, 200]),
    "budget": (450.0, 120.0),
}


# ---- the checkpoint ------------------------------------------------------------------------------------------


def scaled_init(seed: int, device: torch.device):
    """init(name, shape) -> bf16 CPU tensor, drawn on `device` from one seeded generator in file order.

    Every matrix is N(0, 1/fan_in), so a Linear keeps the RMS of its input and attention logits have unit
    variance; RMSNorm weights 1 + N(0, 0.05²); biases N(0, 0.02²); token embeddings N(0, 1), the scale of the
    image features written among them; LoRA A N(0, 1/in) and B N(0, (LORA_B² / r)). Each sublayer then adds
    about unit RMS to the residual stream, which grows like the square root of the depth and never overflows;
    the activations phase measures it."""
    g = torch.Generator(device).manual_seed(seed)

    def init(name: str, shape: torch.Size) -> torch.Tensor:
        x = torch.randn(shape, generator=g, device=device)
        if re.search(r"(norm\d?|ln_q)\.weight$", name):
            x = 1 + 0.05 * x
        elif name.endswith(".bias"):
            x = 0.02 * x
        elif ".lora_B." in name:
            x = x * (LORA_B / shape[1] ** 0.5)
        elif "embed_tokens" not in name:
            x = x / (shape[1:].numel() ** 0.5)  # fan-in: every dimension but the first (Linear, Conv3d, lora_A)
        return x.to(torch.bfloat16).cpu()

    return init


def phase_checkpoint(ctx: dict) -> dict:
    args = ctx["args"]
    tok = build_tokenizer(151936)  # one token per byte, the real special-token ids
    adapter_cfg = json.loads((RELEASED / "adapters" / "adapter_config.json").read_text())
    if args.tiny:
        cfg = model_config(TINY, tok)
        adapter_cfg.update(r=TINY.r, lora_alpha=TINY.alpha)
    else:
        cfg = json.loads((RELEASED / "config.json").read_text())
    path = Path(args.dir) / f"{'tiny' if args.tiny else 'full-size'}-bf16-{INIT}"
    reused = (path / "model.safetensors.index.json").exists()
    gen = torch.device(args.device if torch.device(args.device).type == "cuda" else "cpu")
    write_random(path, cfg, adapter_cfg, tok, scaled_init(0, gen))
    ctx["path"] = path
    files = list(path.glob("*.safetensors")) + list(path.glob("adapters/*.safetensors"))
    params = sum(p.numel() for p in JinaV4.on_meta(path).state_dict().values())
    return {
        "path": str(path),
        "reused": reused,
        "gib": sum(f.stat().st_size for f in files) / 2**30,
        "parameters": params,
        "init": f"{INIT}: {' '.join(scaled_init.__doc__.split())}",
    }


# ---- models and inputs ---------------------------------------------------------------------------------------


def load(ctx: dict, dtype: str) -> JinaV4:
    if dtype not in ctx["models"]:
        ctx["models"][dtype] = JinaV4.from_pretrained(ctx["path"], device=ctx["args"].device, dtype=dtype)
    return ctx["models"][dtype]


def reference(ctx: dict, dtype: torch.dtype):
    """scripts/reference.py on the same device, or None when transformers or peft cannot be imported."""
    try:
        from reference import Reference
    except ImportError as e:
        ctx["no_reference"] = f"{type(e).__name__}: {e}"
        return None
    return Reference(ctx["path"], dtype, ctx["args"].device)


def free(ctx: dict, *dtypes: str) -> None:
    for d in dtypes:
        ctx["models"].pop(d, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def text_of(n_bytes: int, seed: int) -> str:
    """ASCII words of exactly n_bytes characters: one token per byte with the byte-level tokenizer."""
    rng = np.random.default_rng(seed)
    return bytes(rng.choice(np.frombuffer(b"etaoinshrdlucmfwypvbgk    ", np.uint8), max(1, n_bytes))).decode()


def probe_set(model: JinaV4, args) -> tuple[list, list[dict]]:
    """Every probe text and page under every task (texts up to 128 tokens as queries, longer ones as passages):
    jina_v4's prepared items, and what the reference needs to prepare the same inputs itself."""
    items, meta = [], []
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.probe_pages]
    for task in TASKS:
        for i, n in enumerate(args.probe_tokens):
            prompt = "query" if n <= 128 or task == "text-matching" else "passage"
            text = text_of(n - len(f"{prompt.capitalize()}: "), i)
            items += model.prepare([text], task, prompt)
            meta.append({"key": f"{task}/text/{n}", "task": task, "text": text, "prompt": prompt})
        items += model.prepare(probe_images(sizes), task, max_pixels=args.max_pixels)
        meta += [{"key": f"{task}/page/{h}x{w}", "task": task} for h, w in sizes]
    return items, meta


def reference_outputs(ref, items: list, meta: list[dict]) -> dict:
    """The reference, one input at a time: its own tokenization (checked equal to jina_v4's), the same patches."""
    out = {"single": [], "multi": []}
    for it, m in zip(items, meta):
        b = ref.image_batch(it.grid) if it.grid else ref.text_batch([m["text"]], m["task"], m["prompt"])
        if b["input_ids"][0].tolist() != it.input_ids:
            raise ValueError(f"{m['key']}: the reference's token ids differ from jina_v4's")
        grid = torch.tensor([it.grid]) if it.grid else None
        h = ref.hidden(b["input_ids"], b["attention_mask"], m["task"], it.pixel_values, grid)
        out["single"].append(ref.pool(h, b["input_ids"], b["attention_mask"], m["task"])[0])
        out["multi"].append(ref.pool(h, b["input_ids"], b["attention_mask"], m["task"], multivector=True)[0])
    return out


def encode_both(model: JinaV4, items: list) -> dict:
    return {"single": list(model.encode_items(items)), "multi": model.encode_items(items, return_multivector=True)}


def compare(ours: list[torch.Tensor], theirs: list[torch.Tensor], keys: list[str], multi: bool) -> dict:
    """Cosines (of each output, or of each token of multi-vectors), the largest element difference, and the
    output holding the lowest cosine."""
    for a, b, key in zip(ours, theirs, keys):
        if a.shape != b.shape:
            raise ValueError(f"{key}: output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    pairs = [(a.double(), b.double()) for a, b in zip(ours, theirs)]
    cos = [F.cosine_similarity(a, b, dim=-1).view(-1) for a, b in pairs]  # (L,) per multi-vector, (1,) per vector
    worst = min(range(len(cos)), key=lambda i: cos[i].min().item())
    out = {
        "cos_min": cos[worst].min().item(),
        "cos_mean": torch.cat(cos).mean().item(),
        "max_abs": max((a - b).abs().max().item() for a, b in pairs),
        "worst_output": keys[worst],
    }
    if multi:
        out["output_mean_min"] = min(c.mean().item() for c in cos)  # the worst output's mean token cosine
    return out


def summary(ours: dict, theirs: dict, meta: list[dict]) -> dict:
    """compare() over all probe outputs, and over texts and pages apart, single and multi-vector."""
    out = {}
    for head in ("single", "multi"):
        out[head] = {}
        for kind in ("all", "text", "page"):
            idx = [i for i, m in enumerate(meta) if kind in ("all", m["key"].split("/")[1])]
            out[head][kind] = compare(
                [ours[head][i] for i in idx],
                [theirs[head][i] for i in idx],
                [meta[i]["key"] for i in idx],
                head == "multi",
            )
    return out


# ---- phases --------------------------------------------------------------------------------------------------


def phase_activations(ctx: dict) -> dict:
    model = load(ctx, "bfloat16")
    items = model.prepare([text_of(505, 7)], "retrieval") + model.prepare(probe_images([(700, 500)]), "retrieval")
    states: list[torch.Tensor] = []
    with torch.inference_mode():
        model.forward(model.processor.collate(items), hidden_states=states)
    rms = [x.float().pow(2).mean().sqrt().item() for x in states]
    return {
        "tokens": sum(len(it.input_ids) for it in items),
        "residual_rms_by_layer": [round(r, 4) for r in rms],
        "final_rms": rms[-1],
        "final_max_abs": states[-1].float().abs().max().item(),
        "non_finite": int(sum((~torch.isfinite(x)).sum().item() for x in states)),
    }


def phase_parity(ctx: dict) -> dict:
    args = ctx["args"]
    model = load(ctx, "bfloat16")
    items, meta = probe_set(model, args)
    first = items[: len(items) // len(TASKS)]  # the first task's inputs; the others repeat them
    out = {
        "probe": {
            "text_tokens": [len(it.input_ids) for it in first if it.grid is None],
            "pages": [
                {"size": size, "patches": len(it.pixel_values), "tokens": len(it.input_ids)}
                for it, size in zip([it for it in first if it.grid], args.probe_pages)
            ],
            "tasks": TASKS,
            "outputs": 2 * len(items),
        }
    }
    ours = {"padded": encode_both(model, items)}
    try:  # a failing varlen kernel must not cost the other figures
        with execution.mode(attention="varlen"):
            ours["varlen"] = encode_both(model, items)
    except Exception as e:
        out["varlen_error"] = f"{type(e).__name__}: {e}"
    theirs = ref = None
    try:
        ref = reference(ctx, torch.float32)
        if ref is not None:
            theirs = reference_outputs(ref, items, meta)
            out["reference"] = f"transformers {ref_versions()} float32 on {args.device}"
    except Exception as e:  # the comparisons below still run, against jina_v4's fp32
        out["reference_error"] = f"{type(e).__name__}: {e}"
    ref = None
    free(ctx)
    ours["fp32"] = encode_both(load(ctx, "float32"), items)
    free(ctx, "float32")
    if theirs is None:
        out["reference"] = f"none ({ctx.get('no_reference') or out['reference_error']}): against jina_v4 float32"
        theirs = ours["fp32"]
    for name, key in (("padded", "bf16_padded"), ("varlen", "bf16_varlen"), ("fp32", "fp32")):
        if name in ours:
            out[key] = summary(ours[name], theirs, meta)
    if "varlen" in ours:
        out["varlen_vs_padded"] = summary(ours["varlen"], ours["padded"], meta)
    out["finite"] = all(torch.isfinite(v).all().item() for o in ours.values() for h in o.values() for v in h)
    pad, fp32 = out["bf16_padded"], out["fp32"]
    gate = THRESHOLDS["bfloat16"]
    out["goals"] = {"single_cos": GOALS["single"], "token_cos": GOALS["token"]}
    out["goals_met"] = {
        "single_cos": pad["single"]["all"]["cos_min"] >= GOALS["single"],
        "token_cos": pad["multi"]["all"]["cos_min"] >= GOALS["token"],
    }
    bf16 = [out[k] for k in ("bf16_padded", "bf16_varlen") if k in out]
    out["bf16_gate_pass"] = all(
        o[h]["all"]["cos_min"] >= gate[k] for o in bf16 for h, k in (("single", "single"), ("multi", "multi_min"))
    ) and all(o["multi"]["all"]["output_mean_min"] >= gate["multi_mean"] for o in bf16)
    out["fp32_pass"] = max(fp32[h]["all"]["max_abs"] for h in ("single", "multi")) <= THRESHOLDS["float32"]["max_abs"]
    return out


def ref_versions() -> str:
    import peft
    import transformers

    return f"{transformers.__version__} + peft {peft.__version__}"


def phase_flops(ctx: dict) -> dict:
    args, device = ctx["args"], torch.device(ctx["args"].device)
    model = load(ctx, "bfloat16")
    n = args.matmul
    a, b = (torch.randn(n, n, dtype=torch.bfloat16, device=device) for _ in range(2))
    t_sq, _ = measure(lambda: [a @ b for _ in range(10)], args.runs, device)
    achieved, bare, ratio = flop_ratio(model, [args.flop_tokens // 16] * 16, args.runs, device)
    ctx["matmul_rate"] = bare
    return {
        "matmul_square_tflops": 10 * 2 * n**3 / t_sq / 1e12,
        "square": n,
        "matmul_decoder_shapes_tflops": bare / 1e12,
        "forward_tflops": achieved / 1e12,
        "forward_fraction": ratio,
        "forward_tokens": args.flop_tokens // 16 * 16,
    }


def page_sizes(n: int, megapixels: float, seed: int = 4) -> list[tuple[int, int]]:
    """Portrait pages (aspect 1.29 to 1.41, letter to A4) of half to all of `megapixels`."""
    rng = np.random.default_rng(seed)
    mp, aspect = rng.uniform(0.5, 1.0, n) * megapixels * 1e6, rng.uniform(1.29, 1.41, n)
    return [(int((m * a) ** 0.5), int((m / a) ** 0.5)) for m, a in zip(mp, aspect)]


def phase_speed(ctx: dict) -> dict:
    args, device = ctx["args"], torch.device(ctx["args"].device)
    texts = texts_of(args.queries, *args.query_tokens, seed=1) + texts_of(args.passages, *args.passage_tokens, seed=2)
    texts = [texts[i] for i in np.random.default_rng(3).permutation(len(texts))]  # a mixed corpus, in no order
    model = load(ctx, "bfloat16")
    lengths = [len(it.input_ids) for it in model.prepare(texts, "retrieval")]
    pages = model.prepare(probe_images(page_sizes(args.pages, args.page_megapixels)), "retrieval")
    flops, rate = decoder_flops(model, lengths), ctx.get("matmul_rate")
    out = {
        "corpus": {
            "texts": len(texts),
            "tokens": sum(lengths),
            "queries": args.queries,
            "passages": args.passages,
            "longest": max(lengths),
        },
        "pages": {
            "n": len(pages),
            "patches": sum(len(p.pixel_values) for p in pages),
            "tokens": sum(len(p.input_ids) for p in pages),
        },
        "weights_mib": torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else None,
    }

    def row(t_text, m_text, t_img, m_img) -> dict:
        r = {
            "text_s": t_text,
            "tokens_per_s": sum(lengths) / t_text,
            "text_peak_mib": m_text / 2**20,
            "pages_per_s": len(pages) / t_img,
            "page_peak_mib": m_img / 2**20,
            "text_tflops": flops / t_text / 1e12,
        }
        r["text_flop_fraction"] = flops / t_text / rate if rate else None
        return r

    for varlen in (False, True):
        try:
            with execution.mode(attention="varlen" if varlen else "auto"):
                t, m = measure(lambda: model.encode_text(texts, task="retrieval"), args.runs, device)
                ti, mi = measure(lambda: model.encode_items(pages), args.runs, device)
            out["jina_v4_varlen" if varlen else "jina_v4_padded"] = row(t, m, ti, mi)
        except Exception as e:
            if not varlen:
                raise
            out["varlen_error"] = f"{type(e).__name__}: {e}"  # the reference still runs
    try:  # jina_v4's figures stay whatever happens to the reference
        ref = reference(ctx, torch.bfloat16)
        if ref is None:
            out["reference"] = f"none ({ctx['no_reference']})"
            return out
        patches = [(p.pixel_values, p.grid) for p in pages]
        t, m = measure(
            lambda: reference_texts(ref, texts, False),
            args.ref_runs,
            device,
            lambda: reference_texts(ref, texts[:16], False),
        )
        ti, mi = measure(
            lambda: reference_images(ref, patches, False, 1),
            args.ref_runs,
            device,
            lambda: reference_images(ref, patches[:1], False, 1),
        )
        out["reference"] = row(t, m, ti, mi)
    except Exception as e:
        out["reference_error"] = f"{type(e).__name__}: {e}"
    return out


def phase_deterministic(ctx: dict) -> dict:
    """The same inputs alone, together, and among others of other tasks: are the outputs bit-identical?"""
    args = ctx["args"]
    model = load(ctx, "bfloat16")
    prep = model.prepare
    items = prep([text_of(n - 7, 20 + n) for n in args.det_tokens], "retrieval") + prep(
        probe_images([(500, 400)]), "retrieval"
    )
    others = prep([text_of(n, 40 + n) for n in (50, 2 * max(args.det_tokens), 90)], ["code", "text-matching", "code"])
    out = {"inputs": [len(it.input_ids) for it in items]}
    for det in (True, False):
        pairs = []
        for mv in (False, True):

            def enc(batch: list) -> list:
                return list(model.encode_items(batch, return_multivector=mv, deterministic=det))

            alone = [enc([it])[0] for it in items]
            crowded = enc(others[:1] + items + others[1:])[1 : 1 + len(items)]
            pairs += [(a, b) for other in (enc(items), crowded) for a, b in zip(alone, other)]
        out["deterministic" if det else "default"] = {
            "bit_identical": all(torch.equal(a, b) for a, b in pairs),
            "max_abs": max((a.double() - b.double()).abs().max().item() for a, b in pairs),
        }
    return out


# ---- report --------------------------------------------------------------------------------------------------


def environment(args) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "argv": sys.argv[1:],
        "tf32": False,
        "sizes": {k: getattr(args, k) for k in SIZES},
    }
    if torch.device(args.device).type == "cpu":  # every phase runs bf16: native, or emulated and slow
        env["cpu"] = {"capability": torch.backends.cpu.get_cpu_capability(), "bf16": native_bf16() or "emulated"}
    if torch.device(args.device).type == "cuda":
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = {
            "name": p.name,
            "memory_gib": p.total_memory / 2**30,
            "capability": f"{p.major}.{p.minor}",
            "cuda": torch.version.cuda,
        }
    for name in ("transformers", "peft", "tokenizers", "safetensors"):
        try:
            env[name] = __import__(name).__version__
        except Exception as e:  # missing, or broken by the versions around it
            env[name] = f"none ({type(e).__name__}: {e})"
    from jina_v4.model import layers

    env["varlen_attn"] = layers.varlen_kernel() is not None  # used on CUDA in bf16 when switched on
    return env


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, str):
        return x
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e6):
        return f"{x:.1e}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.{digits}g}"


def table(report: dict) -> str:
    """The figures side by side (jina_v4 padded, varlen, the reference, the goal), then one line per phase. On a
    CPU, a first line gives its capability; where it emulates bf16 the speed rows say so."""
    phases, cpu = report["phases"], report["env"].get("cpu")
    tag = " [bf16 emulated]" if cpu and cpu["bf16"] == "emulated" else ""

    def get(*path):
        d = phases
        for k in path:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    rows = []
    for label, head, key, goal in (
        ("single cosine, worst", "single", "cos_min", GOALS["single"]),
        ("token cosine, worst", "multi", "cos_min", GOALS["token"]),
        ("token cosine, mean", "multi", "cos_mean", None),
    ):
        cos = [get("parity", f"bf16_{path}", head, "all", key) for path in ("padded", "varlen")]
        rows.append(
            (
                f"parity, bf16 vs ref fp32: {label}",
                *(c if c is None else f"{c:.6f}" for c in cos),
                None,
                goal and f">= {goal}",
            )
        )
    for head in ("single", "multi"):
        rows.append(
            (
                f"parity, fp32 vs ref fp32: {head} max abs",
                get("parity", "fp32", head, "all", "max_abs"),
                None,
                None,
                f"<= {THRESHOLDS['float32']['max_abs']}",
            )
        )
    for head in ("single", "multi"):
        rows.append(
            (
                f"parity, varlen vs padded: {head} max abs",
                None,
                get("parity", "varlen_vs_padded", head, "all", "max_abs"),
                None,
                "",
            )
        )
    cols = ("jina_v4_padded", "jina_v4_varlen", "reference")
    for label, key, goal in (
        ("text tokens/s", "tokens_per_s", ""),
        ("text FLOP/s / bf16 matmul FLOP/s", "text_flop_fraction", f">= {GOALS['flop_fraction']}"),
        ("text peak MiB above the weights", "text_peak_mib", ""),
        ("pages/s", "pages_per_s", ""),
        ("page peak MiB above the weights", "page_peak_mib", ""),
    ):
        rows.append((f"speed: {label}{tag}", *(get("speed", c, key) for c in cols), goal))
    lines = [f"CPU capability {cpu['capability']}, bf16 {cpu['bf16']}"] if cpu else []
    lines += [f"{'measure':<58} {'padded':>10} {'varlen':>10} {'reference':>10}  goal"]
    lines += [f"{label:<58} {fmt(a):>10} {fmt(b):>10} {fmt(c):>10}  {goal or ''}" for label, a, b, c, goal in rows]
    notes = {
        "checkpoint": lambda p: (
            f"{p['gib']:.2f} GiB, {p['parameters'] / 1e9:.3g} B parameters, {'reused' if p['reused'] else 'written'}"
        ),
        "activations": lambda p: (
            "residual RMS by layer "
            + " ".join(
                fmt(r, 2) for r in p["residual_rms_by_layer"][: -1 : max(1, len(p["residual_rms_by_layer"]) // 6)]
            )
            + f", final RMS {fmt(p['final_rms'])}, max abs "
            f"{fmt(p['final_max_abs'])}, {p['non_finite']} non-finite"
        ),
        "parity": lambda p: (
            f"{p['probe']['outputs']} outputs; goals met: {fmt(all(p['goals_met'].values()))}; "
            f"fp32 pass: {fmt(p['fp32_pass'])}; reference: {p['reference']}"
        ),
        "flops": lambda p: (
            f"bf16{tag} matmul {fmt(p['matmul_decoder_shapes_tflops'])} TFLOP/s (decoder shapes), "
            f"{fmt(p['matmul_square_tflops'])} ({p['square']}^3); packed forward of "
            f"{p['forward_tokens']} tokens {fmt(p['forward_tflops'])} TFLOP/s = "
            f"{fmt(p['forward_fraction'])} of its matmuls"
        ),
        "speed": lambda p: (
            f"{p['corpus']['texts']} texts, {p['corpus']['tokens']} tokens; {p['pages']['n']} pages, "
            f"{p['pages']['patches']} patches"
        ),
        "deterministic": lambda p: (
            f"bit-identical across batches: deterministic=True "
            f"{fmt(p['deterministic']['bit_identical'])} (max abs "
            f"{fmt(p['deterministic']['max_abs'])}), default "
            f"{fmt(p['default']['bit_identical'])} (max abs {fmt(p['default']['max_abs'])})"
        ),
    }
    for name, p in phases.items():
        detail = notes[name](p) if p["status"] == "ok" else p.get("error") or p.get("reason", "")
        lines.append(f"{name:<14}{p['status']:>8} {p.get('seconds', 0):6.1f} s  {detail}")
    return "\n".join(lines)


def write(report: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a tiny checkpoint and inputs: the same code in seconds")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--dir", default="/tmp/jina_v4_gpu_check", help="where the checkpoint is written and reused")
    ap.add_argument("--phases", nargs="+", default=PHASES, choices=PHASES, help="checkpoint always runs")
    for key, (full, tiny) in SIZES.items():
        many = isinstance(full, list)
        ap.add_argument(
            f"--{key.replace('_', '-')}",
            nargs="+" if many else None,
            type=(str if key == "probe_pages" else int) if many else type(full),
            help=f"default {full} ({tiny} with --tiny)",
        )
    args = ap.parse_args(argv)
    for key, sizes in SIZES.items():
        if getattr(args, key) is None:
            setattr(args, key, sizes[args.tiny])
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32, for both models
    torch.backends.cudnn.allow_tf32 = False
    start, out = time.perf_counter(), Path(args.out)
    report = {"env": environment(args), "phases": {}}
    if "cpu" in report["env"]:
        print(f"CPU capability {report['env']['cpu']['capability']}, bf16 {report['env']['cpu']['bf16']}", flush=True)
    ctx = {"args": args, "models": {}}
    funcs = {
        "checkpoint": phase_checkpoint,
        "activations": phase_activations,
        "parity": phase_parity,
        "flops": phase_flops,
        "speed": phase_speed,
        "deterministic": phase_deterministic,
    }
    for name in PHASES:
        t = time.perf_counter()
        if name != "checkpoint" and name not in args.phases:
            continue
        if name != "checkpoint" and t - start > args.budget:  # every phase needs the checkpoint
            report["phases"][name] = {"status": "skipped", "reason": f"past the {args.budget:.0f} s budget"}
        else:
            try:
                report["phases"][name] = {"status": "ok", **funcs[name](ctx)}
            except Exception as e:  # recorded; the next phase still runs
                report["phases"][name] = {
                    "status": "error",
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()[-3000:],
                }
                free(ctx, *list(ctx["models"]))
        free(ctx)  # what the phase left behind, before the next one measures memory
        report["phases"][name]["seconds"] = time.perf_counter() - t
        report["elapsed_s"] = time.perf_counter() - start
        write(report, out)
        print(
            f"[{name}] {report['phases'][name]['status']} in {report['phases'][name]['seconds']:.1f} s "
            f"(elapsed {report['elapsed_s']:.1f} s of {args.budget:.0f})",
            flush=True,
        )
        if report["phases"][name]["status"] == "error":
            print(report["phases"][name]["traceback"], file=sys.stderr, flush=True)
    print(table(report))
    failed = [k for k, v in report["phases"].items() if v["status"] == "error"]
    if failed or report["phases"].get("parity", {}).get("fp32_pass") is False:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
