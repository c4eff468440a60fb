"""The `jina-v4` command (also `python -m jina_v4`), a thin layer over the Python API.

jina-v4 embed "a text" --image page.png -o out.npy     # texts, files, stdin, images; .npy .safetensors .jsonl
jina-v4 score "a query" --doc "a text" --image docs/    # ranked cosine or MaxSim table
jina-v4 heatmap "a query" page.png -o heat.png          # where on the page the query matches
jina-v4 info                                            # config and parameter counts (reads no weights)
jina-v4 serve --model DIR                               # the embeddings HTTP API (serve.py)
jina-v4 eval --data nanobeir-scifact/ -o results.json   # nDCG, Recall, MRR on a BEIR or image folder (evaluate.py)
jina-v4 export --task retrieval --format vllm -o DIR    # merged checkpoints for vLLM or llama.cpp (export.py)
jina-v4 mteb --tasks NFCorpus -o mteb-results/          # MTEB tasks or benchmarks, MTEB's result files (mteb_model.py)
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from .common import DEFAULT_MODEL, loaded_model

DTYPE_HELP = "bfloat16, float16 or float32 (default: the checkpoint's; float32 on a CPU without native bf16)"


class CLIError(Exception):
    pass


def load_model(args):
    model = loaded_model(args.model, args.device, args.dtype, args.quiet)
    model.task = args.task
    return model


def embed(args) -> None:
    if args.ray is not None:
        try:
            from .ray_data import run
        except ImportError as e:
            raise CLIError(f"--ray needs Ray Data ({e}): pip install 'jina_v4[ray]'") from None
        return run(args)
    from . import corpus
    from .jobs import SUFFIXES, Job, run_to_file, run_to_shards

    out = args.output
    sharded = out is not None and (out.endswith("/") or Path(out).is_dir() or not Path(out).suffix)
    if out and not sharded and not out.endswith(SUFFIXES):
        raise CLIError(f"{out}: the output must end in .npy, .safetensors or .jsonl, or name a directory")
    if args.max_length is not None and args.max_length < 1:
        raise CLIError(f"--max-length must be positive, got {args.max_length}")
    fields = ("id", args.text_field, "image")
    rows = corpus.read(args.texts, args.input, args.image, fields, args.on_error, stdin=not args.image)
    if not rows:
        raise CLIError("nothing to embed: give texts, --input files, --image paths, or lines on stdin")
    model = load_model(args)
    start = time.perf_counter()
    settings = {
        "model": str(args.model),
        "task": args.task,
        "dtype": str(model.dtype).replace("torch.", ""),
        "prompt_name": args.prompt_name,
        "multivector": args.multivector,
        "truncate_dim": args.truncate_dim,
        "max_pixels": args.max_pixels,
        "max_length": args.max_length,
        "deterministic": args.deterministic,
    }
    job = Job(model, rows, settings, args.batch_size, args.on_error, args.quiet)
    if sharded:
        counts = run_to_shards(job, Path(out), "." + (args.format or "safetensors"), args.shard_size, args.report)
        report = args.report or str(Path(out) / "skipped.jsonl")
    else:
        counts = run_to_file(job, out, args.report)
        report = args.report or (out + ".skipped.jsonl" if out else "above")
    if not args.quiet:
        print(summary(counts, job.tokens, time.perf_counter() - start, report), file=sys.stderr)


def summary(counts: dict, tokens: int, seconds: float, report: str) -> str:
    """`embedded 25 items (...); 1 skipped (...)`: inputs written and inputs skipped, never one count for both."""
    line = f"embedded {counts['written']} items ({tokens} tokens) in {seconds:.1f} s"
    if counts["skipped"]:
        line += f"; {counts['skipped']} skipped (listed {'above' if report == 'above' else 'in ' + report})"
    if counts.get("written_before") or counts.get("skipped_before"):
        line += f"; an earlier run had embedded {counts['written_before']} and skipped {counts['skipped_before']}"
    return line


def score(args) -> None:
    from ..model.processing import preview
    from . import corpus
    from .scoring import maxsim

    rows = corpus.read(args.doc, args.docs_file, args.image, ("id", args.text_field, "image"))
    if not rows:
        raise CLIError("no documents: give --doc texts, --docs-file files or --image paths")
    docs = [r.input for r in rows]
    model = load_model(args)
    common = dict(
        batch_size=args.batch_size,
        return_multivector=args.multivector,
        max_pixels=args.max_pixels,
        deterministic=args.deterministic,
    )
    q = model.encode([{"text": t} for t in args.queries], prompt_name="query", **common)
    d = model.encode(docs, prompt_name="passage", **common)
    scores = maxsim(q, d) if args.multivector else q @ d.T
    kind = "MaxSim" if args.multivector else "cosine"
    for i, query in enumerate(args.queries):
        print(f"query: {query}")
        print(f"  {'rank':>4}  {kind:>8}  document")
        order = scores[i].argsort(descending=True)[: args.top]
        for rank, j in enumerate(order.tolist(), 1):
            label = f"text: {rows[j].label}" if "text" in docs[j] else f"image: {rows[j].label}"
            print(f"  {rank:>4}  {scores[i, j].item():>8.4f}  {preview(label, 70)}")


def heatmap(args) -> None:
    from PIL import Image

    from ..model.images import load_image
    from .scoring import similarity_map

    model = load_model(args)
    image = load_image(args.image)
    scores = similarity_map(model, args.query, image, max_pixels=args.max_pixels)  # (h, w) merge units
    lo, hi = scores.min().item(), scores.max().item()
    s = (scores - lo) / max(hi - lo, 1e-12)
    heat = Image.fromarray(colormap(s.numpy())).resize(image.size, Image.Resampling.BILINEAR)
    with_scale(Image.blend(image, heat, args.alpha), lo, hi).save(args.output)
    if not args.quiet:
        print(
            f"wrote {args.output} ({image.width}x{image.height}, {scores.shape[0]}x{scores.shape[1]} cells, "
            f"scores {scores.min().item():.3f}..{scores.max().item():.3f})",
            file=sys.stderr,
        )


LEGEND_HEIGHT, LEGEND_MIN_WIDTH = 40, 240  # px under the picture: a colour bar and its values


def with_scale(picture, lo: float, hi: float):
    """The picture with a colour scale under it: the ramp from this image's lowest cell score (left) to its
    highest (right), labelled with the scores at its ends and middle."""
    from PIL import Image, ImageDraw

    width = max(picture.width, LEGEND_MIN_WIDTH)
    out = Image.new("RGB", (width, picture.height + LEGEND_HEIGHT), "white")
    out.paste(picture, (0, 0))
    left, right, top = 8, width - 8, picture.height + 6
    ramp = colormap(np.linspace(0, 1, right - left))[None].repeat(12, axis=0)  # (12, bar width, 3)
    out.paste(Image.fromarray(ramp), (left, top))
    draw = ImageDraw.Draw(out)
    for x, value, anchor in ((left, lo, "la"), ((left + right) // 2, (lo + hi) / 2, "ma"), (right, hi, "ra")):
        draw.line([(x, top + 12), (x, top + 15)], fill="black")
        draw.text((x, top + 17), f"{value:.3g}", fill="black", anchor=anchor)
    return out


def colormap(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 along dark blue, teal, yellow (a perceptually ordered ramp)."""
    stops = np.array([[0.0, 20, 30, 90], [0.5, 30, 150, 140], [1.0, 250, 230, 40]])
    rgb = [np.interp(x, stops[:, 0], stops[:, c]) for c in (1, 2, 3)]
    return np.stack(rgb, -1).round().astype(np.uint8)


def build_meta(model: str):
    """The model on the meta device, from its config files only (a hub id: only those two files are fetched)."""
    from ..model import JinaV4
    from ..model.loading import CONFIG_FILES, resolve

    meta = JinaV4.on_meta(resolve(model, files=CONFIG_FILES))
    return meta, meta.adapter_config


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
    rows = [(k, tensors[k], counts[k]) for k in order]
    rows.append(("base model (no adapters)", sum(n for k, n in tensors.items() if not k.startswith("adapter")), base))
    print(
        f"decoder: {t.num_hidden_layers} layers, hidden {t.hidden_size}, MLP {t.intermediate_size}, "
        f"heads {t.num_attention_heads} (kv {t.num_key_value_heads}, dim {t.head_dim}), vocab {t.vocab_size}, "
        f"rope_theta {t.rope_theta:g}, mrope_section {list(t.mrope_section)}"
    )
    print(
        f"vision:  {v.depth} blocks, hidden {v.hidden_size}, MLP {v.intermediate_size}, heads {v.num_heads} "
        f"(dim {v.head_dim}), patch {v.patch_size}, merge {v.spatial_merge_size}x{v.spatial_merge_size}, "
        f"window {v.window_size}px, full attention in blocks {list(v.fullatt_block_indexes)}, "
        f"out {v.out_hidden_size}"
    )
    print(
        f"tasks: {list(c.task_names)}; LoRA r={adapters.r}, alpha={adapters.lora_alpha:g} "
        f"(scaling {adapters.scaling:g}) on {len(model.adapted)} Linears"
    )
    print(
        f"single vector: {t.hidden_size}-d, Matryoshka dims {list(c.matryoshka_dims)}; "
        f"multi-vector: {c.multi_vector_projector_dim}-d per token"
    )
    print(dtype_line(model, sum(counts.values()), args.device, args.dtype))
    width = max(len(r[0]) for r in rows)
    print(f"{'component':<{width}}  {'tensors':>7}  {'parameters':>15}")
    for name, n_tensors, n_params in rows:
        print(f"{name:<{width}}  {n_tensors:>7,}  {n_params:>15,}")
    if args.layers:
        for title, prefix in (
            ("one decoder layer", "model.layers.0."),
            ("one vision block", "visual.blocks.0."),
            ("the rest of the vision tower", "visual.patch_embed."),
            ("", "visual.merger."),
            ("the heads", "multi_vector_projector."),
        ):
            if title:
                print(f"\n{title}:")
            for name, p in model.state_dict().items():
                if name.startswith(prefix) and (".lora_" not in name or name.endswith("." + c.task_names[0])):
                    print(f"  {name:<58} {str(tuple(p.shape)):>16} {p.numel():>13,}")


def dtype_line(model, parameters: int, device: str | None, dtype: str | None) -> str:
    """What from_pretrained would choose here (loading.choose_dtype), and what the weights take in each dtype."""
    import warnings

    import torch

    from ..model.loading import choose_dtype, to_dtype

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the line says it
        chosen, why = choose_dtype(device, to_dtype(model.config.torch_dtype), dtype and to_dtype(dtype))
    sizes = ", ".join(f"{d} {parameters * to_dtype(d).itemsize / 2**30:.2f} GiB" for d in ("bfloat16", "float32"))
    return f"dtype: {str(chosen).removeprefix('torch.')} on {device} ({why}); the weights take {sizes}"


def evaluate(args) -> None:
    from .evaluate import main as run

    run(args)


def export(args) -> None:
    from .export import main as run

    run(args)


def run_mteb(args) -> None:
    try:
        from .mteb_model import main as run
    except ImportError as e:
        raise CLIError(str(e)) from None
    run(args)


def checkpoint_tasks(argv: list[str]) -> dict:
    """The tasks (config.Task) of the checkpoint that argv's --model names, for the help texts: read from its
    config.json when it is a local directory or already in the hub cache; the release's otherwise."""
    from ..model.loading import CONFIG_FILES, read_configs, resolve

    model = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--model"), DEFAULT_MODEL)
    model = next((a.split("=", 1)[1] for a in argv if a.startswith("--model=")), model)
    try:
        return read_configs(resolve(model, files=CONFIG_FILES, local_files_only=True))[0].tasks
    except Exception:  # not at hand: the help names the release's tasks
        from ..model.config import RELEASED_PROMPTS, Task

        return {t: Task(t, **RELEASED_PROMPTS.get(t, {})) for t in ("retrieval", "text-matching", "code")}


def parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jina-v4", description="jina-embeddings-v4 from the command line")
    sub = ap.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    tasks = checkpoint_tasks(argv) if {"-h", "--help"} & set(argv) else None  # read only when the help is shown
    names = ", ".join(tasks or ["retrieval", "text-matching", "code"])

    def model_options(p, task=True):
        p.add_argument("--model", default=DEFAULT_MODEL, help="hub repo id or checkpoint directory")
        if task:
            p.add_argument("--task", default="retrieval", help=f"a task of the checkpoint: {names} (default retrieval)")
            p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
            p.add_argument("--dtype", help=DTYPE_HELP)
            p.add_argument("--max-pixels", type=int, help="image size bound for this run (default: the config's)")
            p.add_argument("--batch-size", type=int, help="most items per forward pass (default: a token budget)")
            p.add_argument("--quiet", action="store_true", help="no dtype line, no progress bar, no summary line")
            p.add_argument(
                "--deterministic",
                action="store_true",
                help="each input's vectors bit-identical whatever shares its batch (CPU)",
            )

    p = sub.add_parser("embed", help="embed texts and images")
    p.add_argument("texts", nargs="*", help="texts to embed (or lines on stdin)")
    p.add_argument(
        "--input",
        action="append",
        help="a corpus: .jsonl (a text or an image per line, optional id), .parquet, an image directory, "
        "or a file of texts, one per line",
    )
    p.add_argument("--text-field", default="text", help="the JSONL field holding the text (default: text)")
    p.add_argument(
        "--image",
        nargs="+",
        action="extend",
        help="image paths, quoted globs or directories; several may follow one --image (what a shell glob gives)",
    )
    p.add_argument("--prompt-name", default="query", choices=["query", "passage"])
    p.add_argument("--truncate-dim", type=int, help="Matryoshka dimension of the single vectors")
    p.add_argument("--multivector", action="store_true", help="128-d vectors per token instead of one vector")
    p.add_argument(
        "--max-length",
        type=int,
        help="tokens kept of a text, cut on the right (default and most: 32768, the model's)",
    )
    p.add_argument(
        "-o",
        "--output",
        help="out.npy, out.safetensors or out.jsonl, or a directory for shards that a "
        "rerun resumes (default: JSON lines on stdout)",
    )
    p.add_argument(
        "--format",
        choices=["safetensors", "jsonl", "npy"],
        help="the shards' format, when --output is a directory (default: safetensors)",
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=1000,
        help="inputs per shard (default 1000); with --ray, rows per actor batch and per parquet file",
    )
    p.add_argument(
        "--on-error",
        default="fail",
        choices=["fail", "skip"],
        help="a bad input stops the run (fail), or is left out and reported (skip)",
    )
    p.add_argument("--report", help="where skipped inputs are listed (default: beside the output)")
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="embed --input (.jsonl, .parquet, image directories) on Ray into parquet files in -o DIR; "
        "ADDRESS: auto or ray://host:10001 (none: start a local Ray)",
    )
    p.add_argument("--actors", type=int, help="with --ray: model replicas (default: one per GPU, else 1)")
    p.add_argument(
        "--gpus-per-actor", type=float, help="with --ray: GPUs per replica (default: 1 if the cluster has GPUs, else 0)"
    )
    model_options(p)
    p.set_defaults(run=embed)

    p = sub.add_parser("score", help="rank documents (texts or images) for each query")
    p.add_argument("queries", nargs="+")
    p.add_argument("--doc", action="append", default=[], help="a document text")
    p.add_argument("--docs-file", action="append", help="documents as embed --input reads them (.jsonl, .parquet, ...)")
    p.add_argument("--text-field", default="text")
    p.add_argument(
        "--image",
        nargs="+",
        action="extend",
        help="document images: paths, quoted globs or directories; several may follow one --image",
    )
    p.add_argument("--multivector", action="store_true", help="MaxSim of multi-vectors instead of cosine")
    p.add_argument("--top", type=int, default=10)
    model_options(p)
    p.set_defaults(run=score)

    p = sub.add_parser("heatmap", help="draw each image cell's late-interaction score with a query")
    p.add_argument("query")
    p.add_argument("image")
    p.add_argument("-o", "--output", default="heatmap.png")
    p.add_argument("--alpha", type=float, default=0.55, help="heat overlay opacity")
    model_options(p)
    p.set_defaults(run=heatmap)

    p = sub.add_parser("info", help="the checkpoint's config, parameter counts and dtype (reads no weights)")
    p.add_argument("--layers", action="store_true", help="also every tensor of one layer, block and head")
    p.add_argument("--device", help="the device to choose the dtype for (default: cuda when available)")
    p.add_argument("--dtype", help="a dtype to check on that device instead of the default")
    model_options(p, task=False)
    p.set_defaults(run=info)

    p = sub.add_parser("eval", help="retrieval quality (nDCG, Recall, MRR) on a BEIR-layout or image-document folder")
    p.add_argument("--data", required=True, help="corpus.jsonl (or images/), queries.jsonl, qrels/<split>.tsv")
    p.add_argument("--split", help="the qrels file: qrels/<split>.tsv (default: test, or the only one)")
    p.add_argument("--multivector", action="store_true", help="rank by MaxSim of multi-vectors")
    p.add_argument("--dim", type=int, help="Matryoshka dimension of the single vectors (default: all)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 3, 5, 10, 100], help="cut-offs (default 1 3 5 10 100)")
    p.add_argument("--cache", help="a directory keeping the vectors (by model, task, dtype and data) for reruns")
    p.add_argument("-o", "--output", help="the results as JSON (metrics under ndcg@10, recall@100, mrr@10, ...)")
    model_options(p)
    p.set_defaults(run=evaluate)

    p = sub.add_parser("export", help="a task's merged checkpoint for vLLM (Qwen2.5-VL) or llama.cpp (text-only Qwen2)")
    p.add_argument(
        "--format", required=True, choices=["vllm", "text"], help="vllm: with vision; text: Qwen2, no vision"
    )
    p.add_argument("-o", "--output", required=True, help="the directory to write (must be empty or new)")
    model_options(p)
    p.set_defaults(run=export)

    p = sub.add_parser("mteb", help="MTEB tasks or a benchmark, scored by MTEB, written as MTEB's result files")
    p.add_argument("--tasks", nargs="+", help="MTEB task names, or local folders in eval's layouts (BEIR, images/)")
    p.add_argument("--benchmark", help="an MTEB benchmark, e.g. 'ViDoRe(v1)' or 'MTEB(Code, v1)'")
    p.add_argument("--task-types", nargs="+", help="only the tasks of these MTEB types, e.g. Retrieval")
    p.add_argument("--multivector", action="store_true", help="rank by MaxSim of multi-vectors")
    p.add_argument("--dim", type=int, help="Matryoshka dimension of the single vectors (default: all)")
    p.add_argument("--task-map", nargs="+", metavar="KEY=TASK[.PROMPT]", help="e.g. STS=my-task (MTEB prompt keys)")
    p.add_argument("--name", help="the variant's name: the model is jina-v4/NAME in the results")
    p.add_argument("-o", "--output", required=True, help="the results folder (MTEB's ResultCache layout)")
    p.add_argument("--overwrite", action="store_true", help="rerun tasks already there; write beside other models")
    model_options(p)
    p.set_defaults(run=run_mteb)

    from .serve import add_parser as add_serve  # starlette and uvicorn load only when the server starts

    add_serve(sub, tasks)
    return ap


def stdout_closed() -> bool:
    """Whether the reader of stdout has gone (`| head` has exited): polling its pipe then reports an error."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, ValueError, OSError):  # no poll() (Windows), no file descriptor (a test's capture)
        return False


def main(argv: list[str] | None = None) -> int:
    args = parser(argv).parse_args(argv)
    try:
        args.run(args)
        sys.stdout.flush()  # what is still buffered meets a closed pipe here, not at exit
    except BrokenPipeError:
        if not stdout_closed():
            print(f"jina-v4: error: {BrokenPipeError.__name__}: a pipe closed", file=sys.stderr)
            return 1
        # `jina-v4 ... | head`: the reader took what it wanted. End quietly with 0, as standard tools do, and point
        # stdout at /dev/null so that the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(
            "jina-v4: interrupted (a run into a directory keeps its whole shards; rerun it to resume)", file=sys.stderr
        )
        return 130
    except Exception as e:  # the whole message (a hub error says what to do on its later lines), never a traceback
        print(f"jina-v4: error: {str(e).strip() or type(e).__name__}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
