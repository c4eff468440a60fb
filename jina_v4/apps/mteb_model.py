"""jina_v4 as an MTEB model (`jina-v4 mteb`): any JinaV4 instance, changed in Python or loaded from a checkpoint,
behind MTEB 2.x's encoder protocol, scored by MTEB's own evaluation code, its results written as MTEB writes them.

MTEB's conventions for v4 are those of its own wrapper (`JinaV4Wrapper` in mteb's
models/model_implementations/jina_models.py), which loads the released remote code:
- the adapter and prompt by MTEB's prompt key (task name + prompt type, task name, task type + prompt type, task
  type, prompt type: mteb's `get_prompt_name`): Retrieval queries -> retrieval + the query prompt, Retrieval
  documents -> retrieval + the passage prompt, STS and PairClassification -> text-matching,
  DocumentUnderstanding (text queries against page images) -> retrieval + the query prompt;
  a task in code (an eval language ending in -Code, a programming language, or the Programming domain) -> code;
- images through encode_image with max_pixels=37788800;
- an input with both a text and an image: the two single vectors summed then L2-normalised, the two multi-vector
  sets concatenated;
- multi-vectors ragged (one (L_i, 128) tensor per input), scored by MaxSim.
A task type with no mapping is refused with its name (the wrapper would run it as retrieval queries).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import mteb
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.task_metadata import TaskMetadata
    from mteb.languages import PROGRAMMING_LANGS
    from mteb.models.abs_encoder import AbsEncoder, get_prompt_name
    from mteb.models.model_meta import ModelMeta, ScoringFunction
except ImportError as e:  # the CLI turns this into its one-line error
    raise ImportError(f"jina-v4 mteb needs MTEB 2.x ({e}): pip install 'jina_v4[mteb]'") from None

# MTEB's prompt keys -> "task.prompt" (or "task": the query prompt), as mteb's ModelMeta for v4 passes them to
# JinaV4Wrapper (tests/test_mteb.py checks this against the installed mteb).
MODEL_PROMPTS = {
    "Retrieval-query": "retrieval.query",
    "Retrieval-document": "retrieval.passage",
    "STS": "text-matching",
    "PairClassification": "text-matching",
    "DocumentUnderstanding": "retrieval.query",
}
MAX_PIXELS = 37788800  # what JinaV4Wrapper passes to encode_image
PAIRED_TYPES = ("STS", "PairClassification")  # evaluators that take cosine and distances of the vectors themselves


class MTEBError(ValueError):
    pass


def is_code_task(meta: TaskMetadata) -> bool:
    """mteb's rule for switching v4 to its code adapter (get_programming_task_override)."""
    return (
        any(lang.endswith("-Code") for lang in meta.eval_langs)
        or any(lang in PROGRAMMING_LANGS for lang in meta.languages)
        or "Programming" in (meta.domains or [])
    )


def parse_task_map(entries: Sequence[str]) -> dict[str, str]:
    """["Retrieval-query=my-task.query", "STS=text-matching"] -> {key: value}."""
    out = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise MTEBError(f"--task-map {entry!r}: expected KEY=TASK[.query|.passage], e.g. STS=text-matching")
        out[key.strip()] = value.strip()
    return out


def git_commit() -> str:
    """The jina_v4 checkout's commit (short), with '-dirty' when it has uncommitted changes; 'nogit' outside one."""
    root = Path(__file__).resolve().parents[2]
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10)  # noqa: E731
        head = run("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return "nogit"
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "nogit"


def checkpoint_revision(name: str | None) -> str:
    """A hub snapshot's commit (12 digits), or a digest of a local checkpoint's config and weight files' names,
    sizes and times; 'unsaved' for a model given in Python without its checkpoint."""
    if not name:
        return "unsaved"
    from ..model.loading import resolve

    path = Path(name) if Path(name).is_dir() else resolve(name, local_files_only=True)
    if path.parent.name == "snapshots":
        return path.name[:12]
    from .evaluate import model_key

    return hashlib.sha256(repr(model_key(str(path))).encode()).hexdigest()[:12]


class JinaV4MTEB(AbsEncoder):
    """A JinaV4 (any instance: a new pooling, dropped layers, an added task are scored without saving) as an MTEB
    encoder. multivector: MaxSim of 128-d multi-vectors; dim: Matryoshka single vectors (cut, renormalised);
    task_map: entries added to (or replacing) MODEL_PROMPTS; name: the variant (the model is 'jina-v4/<name>' in
    MTEB's results); checkpoint: where the weights came from (for the revision)."""

    def __init__(
        self,
        model,
        *,
        multivector: bool = False,
        dim: int | None = None,
        task_map: dict[str, str] | None = None,
        name: str | None = None,
        checkpoint: str | None = None,
        batch_size: int | None = None,
        max_pixels: int = MAX_PIXELS,
        deterministic: bool = False,
    ) -> None:
        from ..model.heads import head_for

        head_for(multivector, dim, model.config.matryoshka_dims)  # the dim / multivector rules, before any work
        self.model = model
        self.multivector, self.dim = multivector, dim
        self.batch_size, self.max_pixels, self.deterministic = batch_size, max_pixels, deterministic
        self.model_prompts = {**MODEL_PROMPTS, **(task_map or {})}
        for key, value in self.model_prompts.items():
            task, _, prompt = value.partition(".")
            try:
                model.config.tasks_for(task, 1)
            except ValueError as e:
                raise MTEBError(f"task map {key}={value}: {e}") from None
            if prompt not in ("", "query", "passage"):
                raise MTEBError(f"task map {key}={value}: the prompt after '.' must be query or passage")
        mode = "multivector" if multivector else (f"dim{dim}" if dim else "")
        base = Path(str(checkpoint)).name if checkpoint else "unsaved"
        self.variant = name or "-".join(p for p in (base, mode) if p)
        self.checkpoint = checkpoint
        self.mteb_model_meta = ModelMeta(
            loader=None,
            name=f"jina-v4/{self.variant}",
            revision=f"{checkpoint_revision(checkpoint)}_{git_commit()}",
            release_date=None,
            languages=None,
            n_parameters=sum(p.numel() for p in model.parameters()),
            memory_usage_mb=None,
            max_tokens=None,
            embed_dim=None if multivector else (dim or model.config.text_config.hidden_size),
            license=None,
            open_weights=None,
            public_training_code=None,
            public_training_data=None,
            framework=["PyTorch"],
            similarity_fn_name=ScoringFunction.MAX_SIM if multivector else ScoringFunction.COSINE,
            use_instructions=True,
            training_datasets=None,
            adapted_from="jinaai/jina-embeddings-v4",
            modalities=["text", "image"],
            model_type=["late-interaction"] if multivector else ["dense"],
        )

    # ---- MTEB's conventions ---------------------------------------------------------------------------------------

    def resolve(self, task_metadata: TaskMetadata, prompt_type=None) -> tuple[str, str]:
        """(jina_v4 task, prompt name) for an MTEB task and prompt type, or MTEBError naming the task type."""
        key = get_prompt_name(self.model_prompts, task_metadata, prompt_type)
        if key is None:
            raise MTEBError(
                f"{task_metadata.name}: MTEB task type {task_metadata.type!r} has no jina-v4 adapter and prompt "
                f"(mapped: {', '.join(sorted(self.model_prompts))}); map it with --task-map "
                f"{task_metadata.type}=TASK[.query|.passage]"
            )
        task, _, prompt = self.model_prompts[key].partition(".")
        if is_code_task(task_metadata):
            task = "code"
        return task, prompt or "query"

    def check(self, task_metadata: TaskMetadata) -> None:
        """Refuse, before any work, what this encoder cannot run: an unmapped type, multi-vectors for STS or
        PairClassification (their evaluators take cosine and distances of the vectors themselves)."""
        prompt_types = [None] if task_metadata.type in PAIRED_TYPES else ["query", "document"]
        from mteb.types import PromptType

        for p in prompt_types:
            self.resolve(task_metadata, None if p is None else PromptType(p))
        if self.multivector and task_metadata.type in PAIRED_TYPES:
            raise MTEBError(
                f"{task_metadata.name}: MTEB's {task_metadata.type} evaluator takes cosine, Manhattan and Euclidean "
                "distances of single vectors; multi-vectors have none. Run it without --multivector"
            )

    # ---- the encoder protocol ------------------------------------------------------------------------------------

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs: Any):
        """A DataLoader of batches with "text" and/or "image" columns -> (N, D) float32 array, or a list of N
        (L_i, 128) float32 tensors with multi-vectors."""
        from ..model.heads import matryoshka

        self.check(task_metadata)
        task, prompt = self.resolve(task_metadata, prompt_type)
        texts, images = [], []
        for batch in inputs:
            texts += list(batch.get("text") or [])
            images += list(batch.get("image") or [])
        common = {"task": task, "batch_size": self.batch_size, "return_multivector": self.multivector}
        common.update({"deterministic": True} if self.deterministic else {})
        parts = []
        if texts:
            parts.append(self.model.encode_text(texts, prompt_name=prompt, **common))
        if images:
            parts.append(self.model.encode_image(images, max_pixels=self.max_pixels, **common))
        if not parts:
            raise MTEBError(f"{task_metadata.name}: a batch with neither 'text' nor 'image'")
        if len(parts) == 2 and len(texts) != len(images):
            raise MTEBError(f"{task_metadata.name}: {len(texts)} texts and {len(images)} images in one input set")
        if self.multivector:
            return [torch.cat(p).float() for p in zip(*parts)] if len(parts) == 2 else [v.float() for v in parts[0]]
        vectors = parts[0] if len(parts) == 1 else torch.nn.functional.normalize(parts[0] + parts[1], dim=-1)
        return matryoshka(vectors.float(), self.dim).numpy()

    def similarity(self, embeddings1, embeddings2):
        """(N1, N2): cosine of single vectors (unit already), or MaxSim of multi-vectors."""
        from .scoring import maxsim

        if self.multivector:
            return maxsim(embeddings1, embeddings2)
        return torch.as_tensor(np.asarray(embeddings1)).float() @ torch.as_tensor(np.asarray(embeddings2)).float().T

    def similarity_pairwise(self, embeddings1, embeddings2):
        """(N,): the score of each pair (embeddings1[i], embeddings2[i])."""
        from .scoring import maxsim

        if self.multivector:
            return torch.stack([maxsim([a], [b])[0, 0] for a, b in zip(embeddings1, embeddings2)])
        a, b = (torch.as_tensor(np.asarray(x)).float() for x in (embeddings1, embeddings2))
        return (a * b).sum(-1)


# ---- tasks: MTEB's by name or benchmark, or a local folder in `jina-v4 eval`'s layouts ------------------------------


def local_metadata(name: str, type: str, **fields) -> TaskMetadata:
    """The TaskMetadata of a task that lives on this machine: an English text task scored by nDCG@10 unless
    `fields` say otherwise; its dataset path and revision are placeholders (no hub)."""
    defaults = dict(
        description="a local task",
        reference=None,
        dataset={"path": "local", "revision": "local"},
        category="t2t",
        modalities=["text"],
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_10",
        date=None,
        domains=[],
        task_subtypes=None,
        license=None,
        annotations_creators=None,
        dialect=None,
        sample_creation=None,
        bibtex_citation="",
    )
    return TaskMetadata(name=name, type=type, **{**defaults, **fields})


def folder_task(path: str | Path, split: str | None = None, **metadata):
    """An MTEB retrieval task built from a BEIR-layout folder (type Retrieval) or an image-document folder
    (type DocumentUnderstanding, text queries against page images), read as `jina-v4 eval` reads them; no hub.
    metadata: TaskMetadata fields to set (e.g. name=..., domains=["Programming"] for a code task)."""
    from datasets import Dataset, Image

    from .evaluate import read_dataset

    data = read_dataset(path, split)
    kinds = {"image" if "image" in x else "text" for _, x in data.corpus}
    if len(kinds) > 1:
        raise MTEBError(f"{data.path}: a corpus of both texts and images is not one MTEB task; split it in two")
    images = kinds == {"image"}
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(data.path).resolve().name)
    meta = local_metadata(
        f"Local-{name}",
        "DocumentUnderstanding" if images else "Retrieval",
        description=f"A local {'image-document' if images else 'BEIR-layout'} folder: {data.path}",
        dataset={"path": str(data.path), "revision": data.corpus_digest[:12] + data.queries_digest[:12]},
        category="t2i" if images else "t2t",
        modalities=["text", "image"] if images else ["text"],
        eval_splits=[data.split],
    ).model_copy(update=metadata)
    from .evaluate import relevant

    qids = [q for q in data.qrels if q in data.queries and relevant(data.qrels[q])]  # as eval: others are skipped

    class FolderTask(AbsTaskRetrieval):
        metadata = meta

        def load_data(self, num_proc=None, **kwargs) -> None:
            if images:
                corpus = Dataset.from_dict(
                    {"id": [i for i, _ in data.corpus], "image": [str(x["image"]) for _, x in data.corpus]}
                ).cast_column("image", Image())
            else:
                texts = [x["text"] for _, x in data.corpus]
                corpus = Dataset.from_dict({"id": [i for i, _ in data.corpus], "text": texts})
            queries = Dataset.from_dict({"id": qids, "text": [data.queries[q] for q in qids]})
            qrels = {q: data.qrels[q] for q in qids}
            split = {"corpus": corpus, "queries": queries, "relevant_docs": qrels, "top_ranked": None}
            self.dataset = {"default": {data.split: split}}
            self.data_loaded = True

    return FolderTask()


def nearest(name: str, names: Sequence[str], what: str) -> MTEBError:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    close = close or difflib.get_close_matches(name.lower(), [n.lower() for n in names], n=5, cutoff=0.5)
    hint = f"; the nearest: {', '.join(close)}" if close else ""
    return MTEBError(f"{name!r} is not an MTEB {what}{hint}")


def get_tasks(names: Sequence[str] = (), benchmark: str | None = None) -> list:
    """MTEB tasks by name, local folders (a path to a directory), or a benchmark's tasks; an unknown name lists the
    nearest known ones."""
    if benchmark is not None:
        known = [b.name for b in mteb.get_benchmarks()]
        aliases = {a: b.name for b in mteb.get_benchmarks() for a in (getattr(b, "aliases", None) or [])}
        if benchmark not in known and benchmark not in aliases:
            raise nearest(benchmark, known, "benchmark")
        return list(mteb.get_benchmark(aliases.get(benchmark, benchmark)).tasks)
    tasks, wanted = [], []
    for n in names:
        if os.sep in n or n.startswith(".") or Path(n).is_dir():
            tasks.append(folder_task(n))
        else:
            wanted.append(n)
    if wanted:
        try:  # the registry's names, without building every task (mteb.get_tasks() takes half a minute)
            from mteb.get_tasks import _TASKS_REGISTRY

            known = sorted(_TASKS_REGISTRY)
        except ImportError:
            known = sorted({t.metadata.name for t in mteb.get_tasks()})
        for n in wanted:
            if n not in known:
                raise nearest(n, known, "task")
        tasks += list(mteb.get_tasks(tasks=wanted))
    return tasks


# ---- running and writing MTEB's result files -----------------------------------------------------------------------


def model_dirs(results: Path) -> set[tuple[str, str]]:
    """(model folder, revision) pairs under an MTEB results folder (results/<model>/<revision>/)."""
    if not results.is_dir():
        return set()
    return {(m.name, r.name) for m in results.iterdir() if m.is_dir() for r in m.iterdir() if r.is_dir()}


def run(
    encoder: JinaV4MTEB,
    tasks: Sequence,
    output: str | Path,
    overwrite: bool = False,
    quiet: bool = True,
    encode_kwargs: dict | None = None,
) -> list[dict]:
    """Each task through mteb.evaluate into a staging folder beside `output`, then its files moved into
    output/results/<model>/<revision>/ (MTEB's ResultCache layout): an interrupted task leaves no file there.
    A task whose result this model and revision already has is kept, unless overwrite. An output folder holding
    another model's (or revision's) results is refused unless overwrite. Returns per task {task, main_score,
    score, seconds} (seconds: None when kept)."""
    for task in tasks:
        encoder.check(task.metadata)
    output = Path(output)
    meta = encoder.mteb_model_meta
    ours = (meta.model_name_as_path(), meta.revision)
    if output.exists() and not output.is_dir():
        raise MTEBError(f"{output}: not a directory")
    if output.is_dir() and any(output.iterdir()) and not (output / "results").is_dir():
        raise MTEBError(f"{output}: not empty and not an MTEB results folder (no results/); choose another -o")
    others = sorted(model_dirs(output / "results") - {ours})
    if others and not overwrite:
        listed = ", ".join(f"{m}/{r}" for m, r in others[:5])
        raise MTEBError(
            f"{output}: holds results of another model or revision ({listed}); choose another -o, or add "
            f"--overwrite to write {ours[0]}/{ours[1]} beside them"
        )
    final = output / "results" / ours[0] / ours[1]
    summary = []
    for task in tasks:
        name = task.metadata.name
        target = final / f"{name}.json"
        if target.is_file() and not overwrite:
            result = mteb.TaskResult.from_disk(target)
            summary.append(score_row(task, result, None))
            if not quiet:
                print(f"{name}: kept from {target} (--overwrite reruns it)", file=sys.stderr)
            continue
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
        try:
            start = time.perf_counter()
            got = mteb.evaluate(
                encoder,
                [task],
                cache=mteb.ResultCache(staging),
                overwrite_strategy="always",
                show_progress_bar=not quiet,
                encode_kwargs={"show_progress_bar": not quiet, **(encode_kwargs or {})},
            )
            seconds = time.perf_counter() - start
            written = staging / "results" / ours[0] / ours[1]
            final.mkdir(parents=True, exist_ok=True)
            for f in sorted(written.iterdir(), key=lambda p: p.name == f"{name}.json"):  # the task's file last
                if f.name == "run_settings.jsonl" and (final / f.name).is_file():
                    with open(final / f.name, "a", encoding="utf-8") as out:
                        out.write(f.read_text(encoding="utf-8"))
                    continue
                os.replace(f, final / f.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        summary.append(score_row(task, got.task_results[0], seconds))
    return summary


def score_row(task, result, seconds: float | None) -> dict:
    return {
        "task": task.metadata.name,
        "type": task.metadata.type,
        "main_score": task.metadata.main_score,
        "score": result.get_score(),
        "seconds": seconds,
    }


def main(args) -> None:
    """`jina-v4 mteb` (cli.py parses the arguments)."""
    from .common import loaded_model

    if args.task != "retrieval":
        raise MTEBError(f"--task {args.task}: jina-v4 mteb picks adapters by MTEB task type; use --task-map")
    if not args.tasks and not args.benchmark:
        raise MTEBError("give --tasks (MTEB task names or local folders) or --benchmark NAME")
    tasks = get_tasks(args.tasks or (), args.benchmark)
    if args.task_types:
        types = sorted({t.metadata.type for t in tasks})
        tasks = [t for t in tasks if t.metadata.type in args.task_types]
        if not tasks:
            raise MTEBError(f"--task-types {' '.join(args.task_types)}: no such task here (types: {', '.join(types)})")
    task_map = parse_task_map(args.task_map or [])
    model = loaded_model(args.model, args.device, args.dtype, args.quiet)
    encoder = JinaV4MTEB(
        model,
        multivector=args.multivector,
        dim=args.dim,
        task_map=task_map,
        name=args.name,
        checkpoint=str(args.model),
        batch_size=args.batch_size,
        max_pixels=args.max_pixels or MAX_PIXELS,
        deterministic=args.deterministic,
    )
    rows = run(encoder, tasks, args.output, args.overwrite, args.quiet)
    meta = encoder.mteb_model_meta
    print(f"{meta.name} (revision {meta.revision}) -> {Path(args.output) / 'results' / meta.model_name_as_path()}")
    for r in rows:
        took = "kept" if r["seconds"] is None else f"{r['seconds']:.1f} s"
        print(f"{r['task']:<40} {r['type']:<22} {r['main_score']:<14} {r['score']:.4f}  ({took})")
