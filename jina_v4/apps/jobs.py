"""Embedding jobs behind `jina-v4 embed`: inputs encoded chunk by chunk with a progress bar, a per-item error
policy (fail, or skip and report), and the output as one file or as a directory of shards.

Shards are written atomically (a temporary name, then a rename), so an interrupted job (Ctrl-C, kill) leaves
only whole shards, and rerunning the same command computes just the missing ones. A manifest ties the
directory to its inputs and settings, so a resume never mixes two different runs.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..model.heads import head_for
from ..model.processing import preview
from ..pipeline import encode
from .common import atomic_write, error_policy, write_jsonl

SUFFIXES = (".npy", ".safetensors", ".jsonl")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class JobError(Exception):
    pass


def read_texts(texts: list[str], files: list[str] | None, field: str, stdin: bool) -> list[str]:
    """Texts given, then each file's (one per line, or the `field` of each .jsonl object), else stdin's lines."""
    texts = list(texts)
    for file in files or []:
        path = Path(file)
        if not path.is_file():
            raise JobError(f"{file}: no such file")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            for n, line in enumerate(lines, 1):
                try:
                    texts.append(json.loads(line)[field])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise JobError(f"{file}:{n}: not a JSON object with a {field!r} field") from None
        else:
            texts += lines
    if not texts and stdin and not sys.stdin.isatty():
        texts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    return texts


def expand_images(specs: list[str]) -> list[str]:
    """Paths, globs and directories (searched recursively for image files), in a stable order."""
    out = []
    for spec in specs or []:
        path = Path(spec)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif any(c in spec for c in "*?["):
            found = sorted(glob.glob(spec, recursive=True))
        elif path.is_file() or spec.startswith(("http://", "https://")):
            found = [spec]
        else:
            raise JobError(f"{spec}: no such file")
        if not found:
            raise JobError(f"{spec}: matches no image file")
        out += found
    return out


@dataclass
class Job:
    model: object
    inputs: list[dict]  # {"text": ...} or {"image": ...}
    labels: list[str]  # what the outputs and reports call each input
    settings: dict  # prompt_name, multivector, truncate_dim, max_pixels (and, for the manifest, model and task)
    batch_size: int | None = None
    on_error: str = "fail"
    quiet: bool = False
    skipped: list[dict] = field(default_factory=list)
    tokens: int = 0  # tokens embedded so far

    def encode(self, start: int, stop: int) -> tuple[list[int], list[torch.Tensor], list[dict]]:
        """Inputs start..stop -> (indices embedded, their vectors, skipped records)."""
        s, model = self.settings, self.model
        items = model.prepare(
            self.inputs[start:stop], model.task, s["prompt_name"], max_pixels=s["max_pixels"], errors="return"
        )
        head = head_for(s["multivector"], s["truncate_dim"], model.config.matryoshka_dims)
        with torch.inference_mode():
            results = encode(model, items, head, self.batch_size, s["deterministic"], errors="return")
        numbers = range(start, stop)
        records = error_policy(
            results, [f"input {i}" for i in numbers], self.labels[start:stop], self.on_error, JobError
        )
        ok = [j for j, r in enumerate(records) if r is None]
        self.tokens += sum(len(items[j].input_ids) for j in ok)
        skipped = [{"index": start + j, **r} for j, r in enumerate(records) if r is not None]
        return [start + j for j in ok], [results[j].cpu() for j in ok], skipped

    def progress(self, done: int = 0):
        from tqdm import tqdm

        quiet = self.quiet or not sys.stderr.isatty()
        return tqdm(total=len(self.inputs), initial=done, unit="item", disable=quiet, file=sys.stderr)


def json_lines(index: list[int], labels: list[str], vectors: list):
    for i, lab, v in zip(index, labels, vectors):
        yield json.dumps({"index": i, "input": lab, "embedding": v.tolist()}, ensure_ascii=False) + "\n"


def write_vectors(
    path: Path, index: list[int], labels: list[str], vectors: list, multivector: bool, meta: dict
) -> None:
    """One output file: .npy (vectors; multi-vectors zero-padded to (N, Lmax, P)), .safetensors (embeddings,
    mask for multi-vectors, index; inputs and settings as metadata) or .jsonl (index, input, embedding)."""
    if path.suffix == ".jsonl":

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json_lines(index, labels, vectors))

        return atomic_write(path, write)
    if multivector and vectors:
        from .scoring import pad_multivectors

        padded, mask = pad_multivectors(vectors)
        tensors = {"embeddings": padded, "mask": mask}
    else:
        tensors = {"embeddings": torch.stack(vectors) if vectors else torch.empty(0, 0)}
    tensors["index"] = torch.tensor(index, dtype=torch.int64)
    if path.suffix == ".npy":
        return atomic_write(path, lambda tmp: save_npy(tmp, tensors["embeddings"].numpy()))
    from safetensors.torch import save_file

    metadata = {"inputs": json.dumps(labels, ensure_ascii=False), **{k: str(v) for k, v in meta.items()}}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a ".tmp" name
        np.save(f, array)


def run_to_file(job: Job, output: str | None, report: str | None) -> int:
    """The whole job into one file (or JSON lines on stdout). Returns the number of items embedded."""
    index, vectors, skipped = [], [], []
    with job.progress() as bar:
        for start in range(0, len(job.inputs), 256):
            stop = min(start + 256, len(job.inputs))
            i, v, s = job.encode(start, stop)
            index += i
            vectors += v
            skipped += s
            bar.update(stop - start)
    labels = [job.labels[i] for i in index]
    if output is None:
        sys.stdout.writelines(json_lines(index, labels, vectors))
    else:
        write_vectors(Path(output), index, labels, vectors, job.settings["multivector"], job.settings)
    job.skipped = skipped
    if skipped:
        if report or output:
            write_jsonl(Path(report or output + ".skipped.jsonl"), skipped)
        else:
            for r in skipped:
                print(f"skipped input {r['index']} ({preview(r['input'], 100)}): {r['error']}", file=sys.stderr)
    return len(index)


def run_to_shards(job: Job, directory: Path, suffix: str, shard_size: int, report: str | None) -> tuple[int, int]:
    """The job into directory/shard-00000<suffix>, ... of `shard_size` inputs each, resuming a previous run.
    Returns (items embedded now, items already done)."""
    if suffix not in SUFFIXES:
        raise JobError(f"--format must be one of {[s[1:] for s in SUFFIXES]}")
    if shard_size < 1:
        raise JobError(f"--shard-size must be positive, got {shard_size}")
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {
        "inputs": len(job.labels),
        "fingerprint": hashlib.sha256(json.dumps(job.labels, ensure_ascii=False).encode()).hexdigest(),
        "settings": {k: job.settings[k] for k in sorted(job.settings)},
        "shard_size": shard_size,
        "suffix": suffix,
    }
    mpath = directory / "manifest.json"
    if mpath.exists():
        if json.loads(mpath.read_text()) != manifest:
            raise JobError(
                f"{directory} holds a run with other inputs or settings; resume it with the same "
                "command, or write to a new directory"
            )
    else:
        if any(directory.glob("shard-*")):
            raise JobError(f"{directory} holds shards but no manifest.json; use a new directory")
        atomic_write(mpath, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
    for stale in directory.glob("*.tmp"):  # pieces of a shard that was being written when the job stopped
        stale.unlink()
    n = math.ceil(len(job.inputs) / shard_size)
    shard = [directory / f"shard-{k:05d}{suffix}" for k in range(n)]
    todo = [k for k in range(n) if not shard[k].exists()]
    done = sum(min(shard_size, len(job.inputs) - k * shard_size) for k in range(n) if k not in todo)
    with job.progress(done) as bar:
        for k in todo:
            start, stop = k * shard_size, min((k + 1) * shard_size, len(job.inputs))
            index, vectors, skipped = job.encode(start, stop)
            skip_file = shard[k].with_name(shard[k].stem + ".skipped.jsonl")
            if skipped:  # the side file first: a shard that exists always has its report
                write_jsonl(skip_file, skipped)
            if suffix == ".npy":
                atomic_write(
                    shard[k].with_name(shard[k].stem + ".index.npy"),
                    partial(save_npy, array=np.array(index, dtype=np.int64)),
                )
            write_vectors(
                shard[k], index, [job.labels[i] for i in index], vectors, job.settings["multivector"], job.settings
            )
            bar.update(stop - start)
    records = []
    for k in range(n):
        skip_file = shard[k].with_name(shard[k].stem + ".skipped.jsonl")
        if skip_file.exists():
            records += [json.loads(line) for line in skip_file.read_text(encoding="utf-8").splitlines()]
    job.skipped = records
    if records:
        write_jsonl(Path(report) if report else directory / "skipped.jsonl", records)
    return len(job.inputs) - done, done


def read_shards(directory: Path) -> tuple[list[int], list]:
    """All shards of a directory, in order: (input indices, vectors). For tests and downstream tools."""
    manifest = json.loads((directory / "manifest.json").read_text())
    index, vectors = [], []
    for path in sorted(directory.glob(f"shard-?????{manifest['suffix']}")):
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
            index += [r["index"] for r in rows]
            vectors += [torch.tensor(r["embedding"]) for r in rows]
        elif path.suffix == ".npy":
            index += np.load(path.with_name(path.stem + ".index.npy")).tolist()
            vectors += list(torch.from_numpy(np.load(path)))
        else:
            from safetensors.torch import load_file

            t = load_file(path)
            index += t["index"].tolist()
            vectors += [e[m] for e, m in zip(t["embeddings"], t["mask"])] if "mask" in t else list(t["embeddings"])
    return index, vectors
