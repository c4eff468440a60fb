"""The `jina-v4` command: a thin layer over the Python API.

    jina-v4 embed "some text" "more text" --task retrieval      # JSON lines on stdout
    jina-v4 info --model jinaai/jina-embeddings-v4               # config and parameter counts
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

DEFAULT_MODEL = "jinaai/jina-embeddings-v4"


def build_meta(model: str):
    """The model on the meta device, from its config files only (no weights are read)."""
    import torch

    from .config import AdapterConfig, JinaV4Config, read_json
    from .loading import resolve
    from .model import JinaV4

    path = Path(model) if Path(model).is_dir() else resolve(model)
    config = JinaV4Config.from_dict(read_json(path / "config.json"), str(path / "config.json"))
    adapter_file = path / "adapters" / "adapter_config.json"
    adapters = AdapterConfig.from_dict(read_json(adapter_file), str(adapter_file))
    with torch.device("meta"):
        return JinaV4(config, adapters), adapters


def component(name: str) -> str:
    parts = name.split(".")
    if ".lora_" in name:
        return f"adapter {parts[-1]}"
    if parts[0] == "model":
        return "decoder layers" if parts[1] == "layers" else f"decoder {parts[1]}"
    if parts[0] == "visual":
        return "vision blocks" if parts[1] == "blocks" else f"vision {parts[1]}"
    return parts[0]


def info(args) -> None:
    model, adapters = build_meta(args.model)
    c, t, v = model.config, model.config.text_config, model.config.vision_config
    counts, tensors = Counter(), Counter()
    for name, p in model.state_dict().items():
        counts[component(name)] += p.numel()
        tensors[component(name)] += 1
    base = sum(n for k, n in counts.items() if not k.startswith("adapter"))
    order = sorted(counts, key=lambda k: (k.startswith("adapter"), k.startswith("multi"), k.startswith("vision")))
    rows = [("component", "tensors", "parameters")] + [(k, tensors[k], counts[k]) for k in order]
    rows.append(("base model (no adapters)", sum(n for k, n in tensors.items() if not k.startswith("adapter")), base))
    print(f"decoder: {t.num_hidden_layers} layers, hidden {t.hidden_size}, MLP {t.intermediate_size}, "
          f"heads {t.num_attention_heads} (kv {t.num_key_value_heads}, dim {t.head_dim}), vocab {t.vocab_size}, "
          f"rope_theta {t.rope_theta:g}, mrope_section {list(t.mrope_section)}")
    print(f"vision:  {v.depth} blocks, hidden {v.hidden_size}, MLP {v.intermediate_size}, heads {v.num_heads} "
          f"(dim {v.head_dim}), patch {v.patch_size}, merge {v.spatial_merge_size}x{v.spatial_merge_size}, "
          f"window {v.window_size}px, full attention in blocks {list(v.fullatt_block_indexes)}, out {v.out_hidden_size}")
    print(f"tasks: {list(c.task_names)}; LoRA r={adapters.r}, alpha={adapters.lora_alpha:g} "
          f"(scaling {adapters.scaling:g}) on {len(model.adapted)} Linears")
    print(f"single vector: {t.hidden_size}-d, Matryoshka dims {list(c.matryoshka_dims)}; "
          f"multi-vector: {c.multi_vector_projector_dim}-d per token")
    width = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{width}}  {r[1]:>7}  {r[2]:>15}" if r[0] == "component" else
              f"{r[0]:<{width}}  {r[1]:>7,}  {r[2]:>15,}")


def embed(args) -> None:
    from .model import JinaV4

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    model = JinaV4.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    out = model.encode_text(texts, task=args.task, prompt_name=args.prompt_name, truncate_dim=args.truncate_dim,
                            return_multivector=args.multivector, batch_size=args.batch_size)
    for text, vec in zip(texts, out):
        print(json.dumps({"text": text, "embedding": vec.tolist()}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jina-v4", description="jina-embeddings-v4 embeddings from the command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("embed", help="embed texts (arguments, or one per line on stdin) as JSON lines")
    p.add_argument("texts", nargs="*")
    p.add_argument("--task", default="retrieval", help="retrieval, text-matching or code")
    p.add_argument("--prompt-name", default="query", choices=["query", "passage"])
    p.add_argument("--truncate-dim", type=int)
    p.add_argument("--multivector", action="store_true")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub repo id or checkpoint directory")
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.set_defaults(run=embed)
    p = sub.add_parser("info", help="the checkpoint's config and parameter counts (reads no weights)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub repo id or checkpoint directory")
    p.set_defaults(run=info)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"jina-v4: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
