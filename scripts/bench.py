"""Speed and memory of jina_v4 against the reference, back to back on the same machine and the same inputs.

A checkpoint of the real width (hidden 2048, MLP 11008, 16/2 heads, vision 1280/3420 with 16 heads, the real
vocabulary) and reduced depth is written once with random weights (scripts/synthetic.py). Then, medians of
--runs runs each:

  a) text: texts of a log-uniform length mix, tokens per second
  b) images: images of different sizes up to --max-megapixels, images per second
  c) peak memory of each (RSS above the loaded model on CPU; max allocated on GPU)
  d) jina_v4's achieved FLOP/s over the bare matmul FLOP/s of the same Linear shapes (the limit), and what
     deterministic=True costs (time with it over time without)
  e) load time and peak RSS of a full-size bf16 checkpoint (written once) against reading its files
  f) training: forward + backward tokens/s of one task's LoRA on the same batch of texts (jina_v4's packed
     `training.embed` against the reference's padded batch through peft), and peak memory with and without
     per-layer activation checkpointing

The reference is transformers Qwen2.5-VL + peft (scripts/reference.py) run as the released encode_* runs it:
batches of 8 in input order, padded, half precision under autocast; "as released" also computes the tied LM
head's logits for every token and keeps every layer's hidden states, "no LM head" does neither.

On a CPU it first prints the CPU's capability (torch.backends.cpu.get_cpu_capability()), whether it multiplies
bf16 natively, and one 512x2048x11008 matmul's rate in each dtype; the bfloat16 rows are skipped where bf16 is
emulated (--emulated-bf16 runs them, labelled so).

    python scripts/bench.py --dtype float32 bfloat16 --texts 64 --images 8
    python scripts/bench.py --matmul-only        # the matmul rates alone, in seconds
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from jina_v4 import JinaV4  # noqa: E402
from jina_v4.model.images import image_patches, load_image  # noqa: E402
from jina_v4.model.loading import native_bf16  # noqa: E402

from synthetic import real_width, write_checkpoint  # noqa: E402

TASK = "retrieval"


# ---- inputs -------------------------------------------------------------------------------------------


def texts_of(n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """n texts whose token counts (one token per byte in the synthetic vocabulary, plus 7 for "Query: ") are
    log-uniform in [lo, hi]: many short queries, some long documents."""
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.uniform(math.log(lo), math.log(hi), n)).astype(int)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)
    return [bytes(rng.choice(letters, max(1, n_tok - 7))).decode() for n_tok in lengths]


def images_of(n: int, max_mp: float, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mp, aspect = rng.uniform(0.05, max_mp), rng.uniform(0.5, 2.0)
        h, w = int((mp * 1e6 / aspect) ** 0.5), int((mp * 1e6 * aspect) ** 0.5)
        out.append(Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)))
    return out


# ---- measurement helpers ------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> int:
    """Start a peak-memory window; returns the current level (bytes)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the window starts from what is in use
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    return status("VmRSS")


def peak(device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else status("VmHWM")


def status(field: str) -> int:
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))


def measure(fn, runs: int, device, warm=None) -> tuple[float, int]:
    """Median seconds of `runs` calls after a warm-up (`warm`, or one call), and the peak memory above the
    level before the timed calls."""
    (warm or fn)()
    base = reset_peak(device)
    times = []
    for _ in range(runs):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), peak(device) - base


# ---- the reference, as the released encode_* runs it ---------------------------------------------------


def reference_texts(ref, texts, lm_head: bool, batch_size: int = 8):
    embed = ref.ref.model.language_model.embed_tokens.weight
    out = []
    for i in range(0, len(texts), batch_size):
        b = ref.text_batch(texts[i : i + batch_size], TASK)
        states = ref.hidden(b["input_ids"], b["attention_mask"], TASK, output_hidden_states=lm_head)
        h = states[-1] if lm_head else states
        if lm_head:
            with ref.autocast():
                F.linear(h, embed)  # the tied LM head's logits over the whole vocabulary, for every token
        out.append(ref.pool(h, b["input_ids"], b["attention_mask"], TASK))
    return torch.cat(out)


def reference_images(ref, patches, lm_head: bool, batch_size: int):
    embed = ref.ref.model.language_model.embed_tokens.weight
    pad = ref.tokenizer.pad_token_id
    out = []
    for i in range(0, len(patches), batch_size):
        chunk = patches[i : i + batch_size]
        rows = [ref.image_batch(g)["input_ids"][0] for _, g in chunk]
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), pad)
        mask = torch.zeros(len(rows), L, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, : len(r)], mask[j, : len(r)] = r, 1
        pixels = torch.cat([p for p, _ in chunk])
        grids = torch.tensor([g for _, g in chunk])
        states = ref.hidden(ids, mask, TASK, pixels, grids, output_hidden_states=lm_head)
        h = states[-1] if lm_head else states
        if lm_head:
            with ref.autocast():
                F.linear(h, embed)
        out.append(ref.pool(h, ids, mask, TASK))
    return torch.cat(out)


# ---- d) achieved FLOP/s against bare matmuls -----------------------------------------------------------


def linear_shapes(model) -> list[tuple[int, int]]:
    """(in, out) of every decoder Linear that a token passes through."""
    return [
        (m.in_features, m.out_features)
        for layer in model.model.layers
        for m in layer.modules()
        if isinstance(m, torch.nn.Linear)
    ]


def decoder_flops(model, lengths: list[int]) -> float:
    """The decoder's FLOPs on sequences of these lengths: 2·in·out per token per Linear (the task LoRA not
    counted), plus causal attention 2·2·H·d·L(L+1)/2 per layer."""
    cfg = model.config.text_config
    linear = sum(2 * i * o for i, o in linear_shapes(model)) * sum(lengths)
    return linear + cfg.num_hidden_layers * sum(
        2 * cfg.num_attention_heads * cfg.head_dim * n * (n + 1) for n in lengths
    )


def flop_ratio(model, lengths: list[int], runs: int, device) -> tuple[float, float, float]:
    """Achieved FLOP/s of the decoder forward on one packed batch, the bare-matmul FLOP/s of its Linear shapes,
    and their ratio. FLOPs: 2·in·out per token per Linear, plus causal attention 2·2·H·d·L(L+1)/2."""
    from jina_v4.model.processing import Item

    rng = np.random.default_rng(0)
    items = [Item(rng.integers(0, 1000, n).tolist(), TASK) for n in lengths]
    batch = model.processor.collate(items)
    T = sum(lengths)
    shapes = linear_shapes(model)
    flops = decoder_flops(model, lengths)
    with torch.inference_mode():  # as encode_* runs it: the task's LoRA unmerged (its FLOPs are not counted)
        t_fwd, _ = measure(lambda: model.forward(batch), runs, device)
        ws = {(i, o): torch.randn(o, i, dtype=model.dtype, device=device) for i, o in set(shapes)}
        xs = {i: torch.randn(T, i, dtype=model.dtype, device=device) for i, _ in set(shapes)}

        def bare():
            for i, o in shapes:
                F.linear(xs[i], ws[i, o])

        t_mm, _ = measure(bare, runs, device)
    mm_flops = sum(2 * T * i * o for i, o in shapes)
    return flops / t_fwd, mm_flops / t_mm, (flops / t_fwd) / (mm_flops / t_mm)


# ---- e) loading a full-size checkpoint ------------------------------------------------------------------

LOAD_SCRIPT = r"""
import json, os, sys, time, torch
from pathlib import Path
from jina_v4 import JinaV4
path = Path(sys.argv[1])
files = sorted(path.glob("*.safetensors")) + sorted(path.glob("adapters/*.safetensors"))
size = sum(f.stat().st_size for f in files)
def drop_cache():
    for f in files:
        fd = os.open(f, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
def read_files():
    buf = bytearray(64 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
out = {"bytes": size}
for cache in ("cold", "warm"):
    if cache == "cold":
        drop_cache()
    t = time.perf_counter(); read_files(); out[f"read_{cache}"] = time.perf_counter() - t
base = int(open("/proc/self/statm").read().split()[1]) * 4096
for cache in ("cold", "warm"):
    if cache == "cold":
        drop_cache()
    open("/proc/self/clear_refs", "w").write("5")
    t = time.perf_counter()
    model = JinaV4.from_pretrained(path, device="cpu", dtype="bfloat16")
    out[f"load_{cache}"] = time.perf_counter() - t
    for p in model.state_dict().values():  # touch every page: the weights are really in memory
        p.view(-1)[:: 2048].float().sum()
    out[f"load_touch_{cache}"] = time.perf_counter() - t
    out[f"peak_{cache}"] = hwm() - base
    del model
print(json.dumps(out))
"""


def write_random(path: Path, cfg: dict, adapter_cfg: dict, tok, init, shards: int = 2) -> Path:
    """A checkpoint in the released layout from `init(name, shape) -> tensor` (our parameter names), written tensor
    by tensor from a meta-device model's names, so no model is ever built. An existing one is kept: its index,
    written last, marks it complete."""
    from safetensors.torch import save_file

    from jina_v4.model.config import AdapterConfig, JinaV4Config
    from jina_v4.model.loading import adapter_key

    from synthetic import RELEASED, tokenizer_config

    if (path / "model.safetensors.index.json").exists():
        return path
    (path / "adapters").mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = JinaV4(JinaV4Config.from_dict(cfg), AdapterConfig.from_dict(adapter_cfg))
    state = model.state_dict()
    base, weight_map = [k for k in state if ".lora_" not in k], {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        keys = base[i * len(base) // shards : (i + 1) * len(base) // shards]
        save_file({k: init(k, state[k].shape) for k in keys}, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
    lora = {adapter_key(k): init(k, state[k].shape) for k in state if ".lora_" in k}
    save_file(lora, path / "adapters" / "adapter_model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "adapters" / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    (path / "preprocessor_config.json").write_text((RELEASED / "preprocessor_config.json").read_text())
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok)))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def write_full_size(path: Path) -> Path:
    """The released layout at full size with random bf16 weights (N(0, 0.02) everywhere)."""
    from synthetic import RELEASED, build_tokenizer

    g = torch.Generator().manual_seed(0)
    cfg = json.loads((RELEASED / "config.json").read_text())
    adapter_cfg = json.loads((RELEASED / "adapters" / "adapter_config.json").read_text())
    return write_random(
        path,
        cfg,
        adapter_cfg,
        build_tokenizer(151936),
        lambda name, shape: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16),
    )


# ---- the whole run --------------------------------------------------------------------------------------


def bench_dtype(args, ckpt: Path, dtype: str, device, label: str) -> list[tuple]:
    """The rows of one dtype, named `label` (the dtype, marked when the CPU emulates it)."""
    from reference import Reference

    tdtype = getattr(torch, dtype)
    texts = texts_of(args.texts, args.min_tokens, args.max_tokens)
    images = images_of(args.images, args.max_megapixels)
    n_tokens = sum(len(t.encode()) + 7 for t in texts)
    rows = []

    model = JinaV4.from_pretrained(ckpt, device=device, dtype=tdtype)
    t_ours, m_ours = measure(
        lambda: model.encode_text(texts, task=TASK),
        args.runs,
        device,
        lambda: model.encode_text(texts[:4] * 64, task=TASK),
    )
    ti_ours, mi_ours = measure(
        lambda: model.encode_image(images, task=TASK),
        args.runs,
        device,
        lambda: model.encode_image(images[:2], task=TASK),
    )
    td_ours, _ = measure(lambda: model.encode_text(texts, task=TASK, deterministic=True), args.runs, device)
    tid_ours, _ = measure(lambda: model.encode_image(images, task=TASK, deterministic=True), args.runs, device)
    achieved, bare, ratio = flop_ratio(model, [args.flop_tokens // 8] * 8, args.runs, device)
    ours_vec = model.encode_text(texts[:8], task=TASK)
    model = None  # free it before the reference loads
    gc.collect()

    ref = Reference(ckpt, tdtype, str(device))
    patches = [image_patches(load_image(img), ref_image_cfg(ckpt)) for img in images]
    t_rel, m_rel = measure(
        lambda: reference_texts(ref, texts, True), args.runs, device, lambda: reference_texts(ref, texts[:8], True)
    )
    t_nolm, m_nolm = measure(
        lambda: reference_texts(ref, texts, False), args.runs, device, lambda: reference_texts(ref, texts[:8], False)
    )
    ti_rel, mi_rel = measure(
        lambda: reference_images(ref, patches, True, args.ref_image_batch),
        args.runs,
        device,
        lambda: reference_images(ref, patches[:2], True, args.ref_image_batch),
    )
    cos = F.cosine_similarity(ours_vec, reference_texts(ref, texts[:8], False), dim=-1).min().item()
    ref = None
    gc.collect()

    mib, dtype = 2**20, label
    rows.append((f"{dtype}: text tokens/s", n_tokens / t_ours, n_tokens / t_rel, n_tokens / t_nolm, ">= 1.5x, >= 1.2x"))
    rows.append((f"{dtype}: images/s", len(images) / ti_ours, len(images) / ti_rel, None, ">= 2x"))
    rows.append((f"{dtype}: text peak MiB", m_ours / mib, m_rel / mib, m_nolm / mib, "lower"))
    rows.append((f"{dtype}: image peak MiB", mi_ours / mib, mi_rel / mib, None, "lower"))
    rows.append((f"{dtype}: FLOP/s / matmul FLOP/s", ratio, None, None, ">= 0.70"))
    rows.append((f"{dtype}: deterministic/default, text", td_ours / t_ours, None, None, "<= 1.3 (time)"))
    rows.append((f"{dtype}: deterministic/default, images", tid_ours / ti_ours, None, None, "<= 1.3 (time)"))
    print(
        f"[{dtype}] {len(texts)} texts, {n_tokens} tokens; {len(images)} images; achieved "
        f"{achieved / 1e9:.1f} GFLOP/s vs bare matmul {bare / 1e9:.1f} GFLOP/s on {args.flop_tokens} tokens; "
        f"min cosine to the reference on 8 texts {cos:.6f}",
        flush=True,
    )
    return rows


def bench_training(args, ckpt: Path, device) -> list[tuple]:
    """f) One training step's forward + backward, in fp32 (the training dtype), on the same texts: the loss of
    jina_v4.apps.training on the single and multi-vectors of both sides (queries: even texts, passages: odd)."""
    from torch.nn.utils.rnn import pad_sequence

    from jina_v4.apps.training import Embeddings, embed, retrieval_loss, trainable

    from reference import Reference

    texts = texts_of(args.train_texts, args.min_tokens, args.train_max_tokens, seed=1)
    n_tokens = sum(len(t.encode()) + 7 for t in texts)

    def step(e: Embeddings) -> None:
        half = lambda k: Embeddings(e.single[k::2], e.multi[k::2], e.mask[k::2])  # noqa: E731
        retrieval_loss(half(0), half(1)).backward()

    model = JinaV4.from_pretrained(ckpt, device=device, dtype="float32")
    params = list(trainable(model, TASK).values())

    def ours():
        step(embed(model, texts, TASK))
        for p in params:
            p.grad = None

    t_ours, m_ours = measure(ours, args.runs, device)
    model.model.checkpointing = True
    t_ckpt, m_ckpt = measure(ours, args.runs, device)
    model = params = None
    gc.collect()

    ref = Reference(ckpt, torch.float32, str(device))
    ref_params = list(ref.trainable(TASK).values())

    def reference():
        single, multi = ref.embed_with_grad(texts, TASK)
        padded = pad_sequence(multi, batch_first=True)
        mask = torch.arange(padded.shape[1]) < torch.tensor([len(m) for m in multi])[:, None]
        step(Embeddings(torch.stack(single), padded, mask))
        for p in ref_params:
            p.grad = None

    t_ref, m_ref = measure(reference, args.runs, device)
    ref = None
    gc.collect()
    mib = 2**20
    print(
        f"[training] {len(texts)} texts, {n_tokens} tokens, float32; the reference pads them to the longest "
        f"({max(len(t.encode()) + 7 for t in texts)} tokens); with checkpointing {n_tokens / t_ckpt:.0f} tokens/s",
        flush=True,
    )
    return [
        ("float32: train fwd+bwd tokens/s", n_tokens / t_ours, n_tokens / t_ref, None, ">= 1.5x"),
        ("float32: train peak MiB", m_ours / mib, m_ref / mib, None, "lower"),
        ("float32: train peak MiB (ckpt)", m_ckpt / mib, m_ref / mib, None, "lower"),
    ]


def matmul_rates(device, dtypes: list[str], runs: int) -> dict[str, float]:
    """GFLOP/s of one (512, 2048) x (2048, 11008) product, the decoder's widest, in each dtype: what a CPU's
    bf16 is worth (emulated: several times slower than float32; native: faster)."""
    rates = {}
    for dtype in dtypes:
        x = torch.randn(512, 2048, dtype=getattr(torch, dtype), device=device)
        w = torch.randn(11008, 2048, dtype=getattr(torch, dtype), device=device)
        t, _ = measure(lambda: F.linear(x, w), runs, device)
        rates[dtype] = 2 * 512 * 2048 * 11008 / t / 1e9
    return rates


def ref_image_cfg(ckpt: Path):
    from jina_v4.model.config import PreprocessorConfig, read_json

    return PreprocessorConfig.from_dict(read_json(ckpt / "preprocessor_config.json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (the release has 36)")
    ap.add_argument("--vision-layers", type=int, default=4, help="vision blocks, the last full-attention (32)")
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--min-tokens", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=2000)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--max-megapixels", type=float, default=1.0)
    ap.add_argument(
        "--ref-image-batch",
        type=int,
        default=1,
        help="the reference's image batch (the released 8 builds a dense mask over all patches)",
    )
    ap.add_argument("--flop-tokens", type=int, default=4096, help="tokens in the FLOP-ratio batch (8 texts)")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/jina_v4_bench", help="where the synthetic checkpoints are kept")
    ap.add_argument("--skip-load", action="store_true", help="skip e) and its 7.5 GB full-size checkpoint")
    ap.add_argument("--train-texts", type=int, default=16, help="texts of the training batch (f)")
    ap.add_argument("--train-max-tokens", type=int, default=512)
    ap.add_argument("--training-only", action="store_true", help="run f) alone")
    ap.add_argument("--matmul-only", action="store_true", help="only the 512x2048x11008 matmul rate of each dtype")
    ap.add_argument(
        "--emulated-bf16",
        action="store_true",
        help="run the bfloat16 rows on a CPU without native bf16 too (skipped by default: hours, and not the "
        "dtype jina_v4 would choose there)",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    native = native_bf16() if device.type == "cpu" else device.type
    if device.type == "cpu":
        bf16 = f"native ({native})" if native else "emulated (no AVX512-BF16 or AMX)"
        print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, bf16 matmul {bf16}", flush=True)
    rates = matmul_rates(device, args.dtype, args.runs)
    print("512x2048x11008 matmul: " + ", ".join(f"{d} {r:.1f} GFLOP/s" for d, r in rates.items()), flush=True)
    if args.matmul_only:
        return
    labels = {d: d if d != "bfloat16" or native else "bfloat16 (emulated)" for d in args.dtype}
    if "bfloat16" in labels and not native and not args.emulated_bf16:
        print("bfloat16 rows skipped: this CPU emulates bf16 (--emulated-bf16 runs them anyway)", flush=True)
        del labels["bfloat16"]
    root = Path(args.dir)
    spec = real_width(args.layers, args.vision_layers)
    ckpt = root / spec.name
    if not (ckpt / "config.json").exists():
        write_checkpoint(ckpt, spec, seed=0)
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}; checkpoint {ckpt}")
    rows = []
    for dtype in [] if args.training_only else labels:
        rows += bench_dtype(args, ckpt, dtype, device, labels[dtype])
    rows += bench_training(args, ckpt, device)
    print(f"\n{'measure':<38} {'jina_v4':>10} {'ref':>10} {'ratio':>7} {'ref noLM':>10} {'ratio':>7}  target")
    for name, ours, rel, nolm, target in rows:
        lower_better = "peak" in name

        def r(x):
            return "" if x is None else f"{(x / ours if lower_better else ours / x):.2f}"

        fmt = lambda x: "" if x is None else f"{x:.3g}" if x < 100 else f"{x:,.0f}"
        print(f"{name:<38} {fmt(ours):>10} {fmt(rel):>10} {r(rel):>7} {fmt(nolm):>10} {r(nolm):>7}  {target}")
    if not args.skip_load and not args.training_only and device.type == "cpu":
        full = write_full_size(root / "full-size-bf16")
        out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(full)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr)
        r = json.loads(out.stdout)
        gib = 2**30
        print(f"\nfull-size bf16 checkpoint: {r['bytes'] / gib:.2f} GiB in its files")
        for cache in ("cold", "warm"):
            print(
                f"  {cache} cache: read files {r[f'read_{cache}']:.2f} s; "
                f"from_pretrained {r[f'load_{cache}']:.2f} s, "
                f"+ every page touched {r[f'load_touch_{cache}']:.2f} s "
                f"({r[f'load_touch_{cache}'] / r[f'read_{cache}']:.2f}x reading; target <= 1.5x); "
                f"peak RSS {r[f'peak_{cache}'] / gib:.2f} GiB "
                f"({r[f'peak_{cache}'] / r['bytes']:.2f}x the weights; target <= 1.1x)"
            )


if __name__ == "__main__":
    main()
