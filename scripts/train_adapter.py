"""Train one task adapter of jina-embeddings-v4 on a JSONL file with the paper's losses (jina_v4/training.py);
--out becomes a complete checkpoint directory holding the old tasks and the trained one.

Rows are {"query", "positive", "negatives": [...]} (retrieval: NCE on dense and late scores + their KL, hard
negatives optional) or {"text1", "text2", "score"} (CoSENT). A side is a text, {"text": ...}, {"image": path or
URL}, or a string ending in an image suffix (.png, .jpg, ...), which is a path relative to the data file. Each
step draws a batch of text-only rows and a batch of rows with an image (the paper's B_txt and B_multi).

    python scripts/train_adapter.py --model DIR --data legal.jsonl --task legal --init-from retrieval \\
        --steps 1000 --lr 1e-4 --batch-size 32 --out legal-model
    torchrun --nproc_per_node 2 scripts/train_adapter.py ...   # --batch-size per process; gloo on CPU, nccl on GPU

The state (adapter, optimizer, step, RNG) is saved atomically every --save-every steps under OUT/training/;
running the same command again resumes from it (a larger --steps continues a finished run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from jina_v4 import JinaV4
from jina_v4.apps.common import atomic_write
from jina_v4.apps.saving import save_checkpoint
from jina_v4.apps.training import backward, cosent_loss, gather_tensor, joint_loss, sync_grads, trainable, world
from jina_v4.model.images import load_image
from jina_v4.model.loading import resolve

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")
PAIRS, SCORED = ("query", "positive"), ("text1", "text2", "score")


class DataError(ValueError):
    pass


def side(value, where: str, base: Path):
    """One side of a row -> a model input: a str (text), a Path (image file) or {"image": URL}."""
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), str):
        ((kind, v),) = value.items()
        if kind == "text":
            return v
        if kind == "image":
            return {"image": v} if v.startswith(("http://", "https://")) else base / v
    elif isinstance(value, str):
        if "\n" not in value and value.lower().endswith(IMAGE_SUFFIXES):
            return base / value
        return value
    raise DataError(f"{where}: expected a text, {{'text': ...}} or {{'image': path}}, got {value!r:.80}")


def read_data(path: Path, check_images: bool = True) -> tuple[str, list[dict]]:
    """The rows of a JSONL file, checked: ('pairs' | 'scored', rows). Errors name the line."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows, kind = [], None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        this = "scored" if "text1" in row or "score" in row else "pairs"
        kind = kind or this
        if this != kind:
            raise DataError(f"{where}: a {this} row in a file of {kind} rows (every row needs the same fields)")
        for f in PAIRS if kind == "pairs" else SCORED:
            if f not in row:
                raise DataError(f"{where}: missing field {f!r}")
        if kind == "scored":
            if isinstance(row["score"], bool) or not isinstance(row["score"], (int, float)):
                raise DataError(f"{where}: 'score' must be a number, got {row['score']!r:.40}")
            rows.append(
                {
                    "a": side(row["text1"], f"{where}: text1", path.parent),
                    "b": side(row["text2"], f"{where}: text2", path.parent),
                    "score": float(row["score"]),
                }
            )
        else:
            negatives = row.get("negatives", [])
            if not isinstance(negatives, list):
                raise DataError(f"{where}: 'negatives' must be a list")
            rows.append(
                {
                    "a": side(row["query"], f"{where}: query", path.parent),
                    "b": side(row["positive"], f"{where}: positive", path.parent),
                    "neg": [side(x, f"{where}: negatives[{i}]", path.parent) for i, x in enumerate(negatives)],
                }
            )
        for x in [rows[-1]["a"], rows[-1]["b"], *rows[-1].get("neg", [])]:
            if check_images and not isinstance(x, str):
                try:
                    load_image(x if isinstance(x, Path) else x["image"])
                except Exception as e:
                    raise DataError(f"{where}: cannot read image {x} ({type(e).__name__}: {e})") from None
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    return kind, rows


def is_image(row: dict) -> bool:
    return any(not isinstance(x, str) for x in [row["a"], row["b"], *row.get("neg", [])])


def draw(n: int, size: int, step: int, seed: int) -> list[int]:
    """Rows of global batch `step`: consecutive slices of a seeded permutation per epoch (the last, partial,
    slice of an epoch is skipped), so a resumed run draws what an uninterrupted one would."""
    per_epoch = n // size
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[k * size : (k + 1) * size].tolist()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (or hub id) to start from")
    ap.add_argument("--data", required=True, type=Path, help="JSONL rows (see above)")
    ap.add_argument("--task", required=True, help="the task to train: a new name, or one of the model's")
    ap.add_argument("--init-from", help="start the new task as a copy of this task (the paper's stage 2)")
    ap.add_argument("--query-prefix", default="Query: ", help="a new task's prompt rule: the prefix of queries")
    ap.add_argument(
        "--passage-prefix", default="Passage: ", help="... and of passages (the query prefix again: a symmetric task)"
    )
    ap.add_argument("--out", required=True, type=Path, help="output checkpoint directory")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=32, help="rows per batch kind and process")
    ap.add_argument("--temperature", type=float, default=0.02, help="τ of NCE and KL (the paper's code adapter)")
    ap.add_argument("--cosent-temperature", type=float, default=0.05)
    ap.add_argument(
        "--weights",
        type=float,
        nargs="+",
        default=[1.0],
        metavar="W",
        help="w1..w6 of the joint loss (dense NCE, late NCE, KL; text then multimodal); 1 or 3 "
        "values apply to both batches",
    )
    ap.add_argument(
        "--matryoshka-dims",
        type=int,
        nargs="*",
        default=[],
        help="average the dense loss over these truncated dims (e.g. 128 256 512 1024 2048)",
    )
    ap.add_argument("--hard-negatives", type=int, help="negatives used per row (default: all listed)")
    ap.add_argument("--dropout", type=float, help="LoRA dropout (default: adapter_config.json's)")
    ap.add_argument("--checkpointing", action="store_true", help="recompute each decoder layer in the backward")
    ap.add_argument("--minibatch", type=int, help="GradCache: embed this many inputs per forward")
    ap.add_argument("--max-length", type=int, default=512, help="text tokens per input")
    ap.add_argument("--max-pixels", type=int, help="image size bound (default: the preprocessor's)")
    ap.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16 for weights and adapter")
    ap.add_argument("--device", help="default: cuda if available, else cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=100)
    ap.add_argument("--quiet", action="store_true")
    return ap


def settings(args, data: bytes, size: int) -> dict:
    """What a resumed run must share with the saved one (--steps and --save-every may change)."""
    keep = (
        "model",
        "task",
        "init_from",
        "query_prefix",
        "passage_prefix",
        "lr",
        "weight_decay",
        "batch_size",
        "temperature",
        "cosent_temperature",
        "weights",
        "matryoshka_dims",
        "hard_negatives",
        "dropout",
        "minibatch",
        "max_length",
        "max_pixels",
        "dtype",
        "seed",
    )
    return {**{k: getattr(args, k) for k in keep}, "data": hashlib.sha256(data).hexdigest(), "world_size": size}


def main(argv: list[str] | None = None) -> float:
    args = parser().parse_args(argv)
    if len(args.weights) not in (1, 3, 6):
        raise SystemExit("error: --weights takes 1, 3 or 6 values")
    weights = args.weights * (6 // len(args.weights))
    try:
        kind, rows = read_data(args.data)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns_group = size > 1 and not dist.is_initialized()  # torchrun: one process per rank, env:// rendezvous
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, size = world()
    kinds = {
        "pairs": [[i for i, r in enumerate(rows) if not is_image(r)], [i for i, r in enumerate(rows) if is_image(r)]],
        "scored": [list(range(len(rows)))],
    }[kind]
    sizes = [min(args.batch_size, len(k) // size) for k in kinds]
    if any(k and not s for k, s in zip(kinds, sizes)):
        raise SystemExit(f"error: {args.data}: too few rows for {size} processes")

    source = resolve(args.model)
    model = JinaV4.from_pretrained(source, device=device, dtype=args.dtype)
    hidden = model.config.text_config.hidden_size
    if any(not 0 < d <= hidden for d in args.matryoshka_dims):
        raise SystemExit(f"error: --matryoshka-dims {args.matryoshka_dims}: each must be in 1..{hidden}")
    torch.manual_seed(args.seed)
    if args.task not in model.config.task_names:
        model.add_task(args.task, init_from=args.init_from, query=args.query_prefix, passage=args.passage_prefix)
    elif args.init_from:
        raise SystemExit(f"error: --init-from makes a new task, but {args.task!r} exists already")
    params = trainable(model, args.task)
    if args.dropout is not None:
        for m in model.modules():
            if hasattr(m, "lora_A"):
                m.dropout = args.dropout
    model.train()
    model.model.checkpointing = args.checkpointing
    opt = torch.optim.AdamW(params.values(), lr=args.lr, weight_decay=args.weight_decay)
    fingerprint = settings(args, args.data.read_bytes(), size)
    state_file, step, history = args.out / "training" / "state.pt", 0, []
    if state_file.exists():
        state = torch.load(state_file, weights_only=False)
        if state["settings"] != fingerprint:
            diff = sorted(k for k in fingerprint if state["settings"].get(k) != fingerprint[k])
            raise SystemExit(
                f"error: {args.out} holds a run with other settings ({', '.join(diff)}); use another --out"
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["params"][n])
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        torch.set_rng_state(state["rng"][rank][0])
        if device.type == "cuda" and state["rng"][rank][1] is not None:
            torch.cuda.set_rng_state(state["rng"][rank][1], device)
    elif args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"error: {args.out} exists and holds no training state; use an empty or new directory")
    else:
        if size > 1:  # every rank starts from rank 0's adapter
            for p in params.values():
                dist.broadcast(p.data, 0)
        torch.manual_seed(args.seed * 1000 + rank)  # dropout masks differ between ranks

    def prepare(xs, prompt):
        return model.prepare(xs, args.task, prompt, args.max_length, args.max_pixels) if xs else []

    def groups_of(step: int):
        groups, scores = [], None
        for rows_of_kind, b in zip(kinds, sizes):
            if not rows_of_kind:  # no row of this kind anywhere: None on every rank
                groups += [None, None, None]
                continue
            picked = draw(len(rows_of_kind), b * size, step, args.seed)[rank * b : (rank + 1) * b]
            rs = [rows[rows_of_kind[i]] for i in picked]
            if kind == "scored":
                scores = torch.tensor([r["score"] for r in rs], device=device)
                return [prepare([r["a"] for r in rs], "query"), prepare([r["b"] for r in rs], "query")], scores
            negs = [x for r in rs for x in r["neg"][: args.hard_negatives]]
            groups += [
                prepare([r["a"] for r in rs], "query"),
                prepare([r["b"] for r in rs], "passage"),
                prepare(negs, "passage"),
            ]
        return groups, scores

    def save(step: int) -> None:
        rngs = [None] * size
        local = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        if size > 1:
            dist.all_gather_object(rngs, local)
        else:
            rngs = [local]
        if rank == 0:
            save_checkpoint(model, source, args.out, [args.task])
            state = {
                "settings": fingerprint,
                "step": step,
                "history": history,
                "rng": rngs,
                "params": {n: p.detach().cpu() for n, p in params.items()},
                "optimizer": opt.state_dict(),
            }
            state_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(state_file, lambda tmp: torch.save(state, tmp))
        if size > 1:
            dist.barrier()

    bar = tqdm(total=args.steps, initial=step, unit="step", disable=args.quiet or rank != 0, file=sys.stderr)
    while step < args.steps:
        groups, scores = groups_of(step)
        if kind == "scored":
            scores = gather_tensor(scores)

            def loss_fn(e):
                return cosent_loss(e[0], e[1], scores, args.cosent_temperature, args.matryoshka_dims)
        else:

            def loss_fn(e):
                text = tuple(e[:3]) if e[0] is not None else None
                multimodal = tuple(e[3:]) if e[3] is not None else None
                return joint_loss(text, multimodal, args.temperature, weights, args.matryoshka_dims)

        loss = backward(model, groups, loss_fn, args.minibatch)
        sync_grads(list(params.values()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        history.append(float(loss))
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.4f}")
        if step % args.save_every == 0 or step == args.steps:
            save(step)
    bar.close()
    if not (args.out / "config.json").exists():  # a finished run rerun: the checkpoint is already there
        save(step)
    if owns_group:
        dist.destroy_process_group()
    return history[-1] if history else float("nan")


if __name__ == "__main__":
    main()
