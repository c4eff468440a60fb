"""Embedding jobs behind `jina-v4 embed`: inputs encoded chunk by chunk with a progress bar, a per-item error
policy (fail, or skip and report), and the output as one file or as a directory of shards.

Shards are written atomically (a temporary name, then a rename), so an interrupted job (Ctrl-C, kill) leaves
only whole shards, and rerunning the same command computes just the missing ones. A manifest ties the
directory to its inputs and settings, so a resume never mixes two different runs.
"""

from __future__ import annotations

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
from ..model.processing import MAX_TEXT_TOKENS
from ..pipeline import encode
from .common import atomic_write, error_policy, json_line, write_jsonl
from .corpus import Row, name

SUFFIXES = (".npy", ".safetensors", ".jsonl")


class JobError(Exception):
    pass


@dataclass
class Job:
    model: object
    rows: list[Row]  # corpus.read: every input, bad rows of the reader included, by global index
    settings: dict  # prompt_name, multivector, truncate_dim, max_pixels, max_length; model and task: the manifest's
    batch_size: int | None = None
    on_error: str = "fail"
    quiet: bool = False
    skipped: list[dict] = field(default_factory=list)  # the report: index, id, input, error
    tokens: int = 0  # tokens embedded so far

    def encode(self, start: int, stop: int) -> tuple[list[Row], list[torch.Tensor], list[dict]]:
        """Inputs start..stop -> (the rows embedded, their vectors, skip records of the others)."""
        s, model = self.settings, self.model
        rows = self.rows[start:stop]
        good = [r for r in rows if r.error is None]
        items = model.prepare(
            [r.input for r in good],
            model.task,
            s["prompt_name"],
            s["max_length"] or MAX_TEXT_TOKENS,
            s["max_pixels"],
            errors="return",
        )
        head = head_for(s["multivector"], s["truncate_dim"], model.config.matryoshka_dims)
        with torch.inference_mode():
            results = encode(model, items, head, self.batch_size, s["deterministic"], errors="return")
        names = [name(r.index, r.id) for r in good]
        records = error_policy(results, names, [r.label for r in good], self.on_error, JobError)
        ok = [j for j, r in enumerate(records) if r is None]
        self.tokens += sum(len(items[j].input_ids) for j in ok)
        skipped = [r.record() for r in rows if r.error is not None]
        skipped += [good[j].record(rec["error"]) for j, rec in enumerate(records) if rec is not None]
        return [good[j] for j in ok], [results[j].cpu() for j in ok], sorted(skipped, key=lambda r: r["index"])

    def progress(self, done: int = 0):
        from tqdm import tqdm

        quiet = self.quiet or not sys.stderr.isatty()
        return tqdm(total=len(self.rows), initial=done, unit="item", disable=quiet, file=sys.stderr)

    def fingerprint(self) -> str:
        """What the inputs are, for the manifest: ids and labels (image bytes by their hash)."""
        keys = []
        for r in self.rows:
            image = r.input.get("image") if r.input else None
            keys.append([r.id, hashlib.sha256(image).hexdigest() if isinstance(image, bytes) else r.label])
        return hashlib.sha256(json.dumps(keys).encode()).hexdigest()


def json_lines(rows: list[Row], vectors: list):
    for r, v in zip(rows, vectors):
        yield json_line({"index": r.index, "id": r.id, "input": r.label, "embedding": v.tolist()})


def write_vectors(path: Path, rows: list[Row], vectors: list, multivector: bool, meta: dict) -> None:
    """One output file: .npy (vectors; multi-vectors zero-padded to (N, Lmax, P)), .safetensors (embeddings,
    mask for multi-vectors, index; inputs, ids and settings as metadata) or .jsonl (index, id, input, embedding)."""
    if path.suffix == ".jsonl":

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json_lines(rows, vectors))

        return atomic_write(path, write)
    if multivector and vectors:
        from .scoring import pad_multivectors

        padded, mask = pad_multivectors(vectors)
        tensors = {"embeddings": padded, "mask": mask}
    else:
        tensors = {"embeddings": torch.stack(vectors) if vectors else torch.empty(0, 0)}
    tensors["index"] = torch.tensor([r.index for r in rows], dtype=torch.int64)
    if path.suffix == ".npy":
        return atomic_write(path, lambda tmp: save_npy(tmp, tensors["embeddings"].numpy()))
    from safetensors.torch import save_file

    metadata = {
        "inputs": json_line([r.label for r in rows]).strip(),
        "ids": json_line([r.id for r in rows]).strip(),
        **{k: str(v) for k, v in meta.items()},
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a ".tmp" name
        np.save(f, array)


def run_to_file(job: Job, output: str | None, report: str | None) -> dict:
    """The whole job into one file (or JSON lines on stdout). Returns the counts: written, skipped."""
    rows, vectors, skipped = [], [], []
    with job.progress() as bar:
        for start in range(0, len(job.rows), 256):
            stop = min(start + 256, len(job.rows))
            r, v, s = job.encode(start, stop)
            rows += r
            vectors += v
            skipped += s
            bar.update(stop - start)
    if output is None:
        sys.stdout.writelines(json_lines(rows, vectors))
    else:
        write_vectors(Path(output), rows, vectors, job.settings["multivector"], job.settings)
    job.skipped = skipped
    if skipped:
        if report or output:
            write_jsonl(Path(report or output + ".skipped.jsonl"), skipped)
        else:
            for r in skipped:
                print(f"skipped {name(r['index'], r['id'])} ({r['input'][:100]}): {r['error']}", file=sys.stderr)
    return {"written": len(rows), "skipped": len(skipped)}


def run_to_shards(job: Job, directory: Path, suffix: str, shard_size: int, report: str | None) -> dict:
    """The job into directory/shard-00000<suffix>, ... of `shard_size` inputs each, resuming a previous run.
    Returns the counts: written and skipped by this run, and by earlier runs (written_before, skipped_before)."""
    if suffix not in SUFFIXES:
        raise JobError(f"--format must be one of {[s[1:] for s in SUFFIXES]}")
    if shard_size < 1:
        raise JobError(f"--shard-size must be positive, got {shard_size}")
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {
        "inputs": len(job.rows),
        "fingerprint": job.fingerprint(),
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
    n = math.ceil(len(job.rows) / shard_size)
    shard = [directory / f"shard-{k:05d}{suffix}" for k in range(n)]
    skip_file = [s.with_name(s.stem + ".skipped.jsonl") for s in shard]
    todo = [k for k in range(n) if not shard[k].exists()]
    size = [min(shard_size, len(job.rows) - k * shard_size) for k in range(n)]
    done = sum(size) - sum(size[k] for k in todo)
    with job.progress(done) as bar:
        for k in todo:
            start, stop = k * shard_size, min((k + 1) * shard_size, len(job.rows))
            rows, vectors, skipped = job.encode(start, stop)
            if skipped:  # the side file first: a shard that exists always has its report
                write_jsonl(skip_file[k], skipped)
            if suffix == ".npy":
                atomic_write(
                    shard[k].with_name(shard[k].stem + ".index.npy"),
                    partial(save_npy, array=np.array([r.index for r in rows], dtype=np.int64)),
                )
            write_vectors(shard[k], rows, vectors, job.settings["multivector"], job.settings)
            bar.update(stop - start)
    records = {k: [] for k in range(n)}
    for k in range(n):
        if skip_file[k].exists():
            records[k] = [json.loads(line) for line in skip_file[k].read_text(encoding="utf-8").splitlines()]
    job.skipped = [r for k in range(n) for r in records[k]]
    if job.skipped:
        write_jsonl(Path(report) if report else directory / "skipped.jsonl", job.skipped)
    now = sum(len(records[k]) for k in todo)
    before = len(job.skipped) - now
    return {
        "written": len(job.rows) - done - now,
        "skipped": now,
        "written_before": done - before,
        "skipped_before": before,
    }


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
