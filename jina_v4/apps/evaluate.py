"""Retrieval evaluation (`jina-v4 eval`): embed a corpus and its queries, rank, and score the ranking as trec_eval
(and so BEIR and MTEB) does.

Data folders:
- BEIR layout (NanoBEIR, MTEB retrieval sets): `corpus.jsonl` rows {"_id", "title", "text"} (a document is
  title + " " + text when the title is not empty), `queries.jsonl` rows {"_id", "text"}, `qrels/<split>.tsv`
  with a header line and rows `query-id <TAB> corpus-id <TAB> score`. A corpus row may name an image instead,
  {"_id", "image": "pages/p1.png"} (relative to the folder): text and image documents can share a corpus.
- Image documents (ViDoRe-style): `images/<id>.<png|jpg|jpeg|webp|bmp|tif|tiff>` (the file name without its
  suffix is the document id) with `queries.jsonl` and `qrels/<split>.tsv` as above, and no corpus.jsonl.

Metrics, per query, averaged over the queries that have at least one relevant document (grade >= 1; the
others are skipped, as trec_eval's relevance level 1 has nothing to find for them):
- nDCG@k: Σ_{r<=k} grade(d_r) / log2(r + 1) over the ranking, divided by the same sum over the qrels' grades in
  decreasing order (the ideal ranking); the grade is the gain (linear), unjudged documents gain 0.
- Recall@k: relevant documents in the top k / relevant documents in the qrels.
- MRR@k: 1 / the rank of the first relevant document in the top k, 0 when there is none.
Ties in score are broken as trec_eval breaks them: by document id, in decreasing string order.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_KS = (1, 3, 5, 10, 100)
METRICS = ("ndcg", "recall", "mrr")


class DataError(ValueError):
    pass


# ---- data ---------------------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    path: Path
    split: str
    corpus: list[tuple[str, dict]]  # (id, {"text": ...} or {"image": path})
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    corpus_digest: str = ""
    queries_digest: str = ""
    skipped: dict[str, int] = field(default_factory=dict)


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("_id"), (str, int)):
                raise DataError(f"{path}:{n}: expected an object with an '_id'")
            rows.append((n, row))
    return rows


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            cols = line.rstrip("\r\n").split("\t")
            if not line.strip() or (n == 1 and cols[0] == "query-id"):
                continue
            if len(cols) == 4:  # TREC form: query 0 document grade
                cols = [cols[0], cols[2], cols[3]]
            if len(cols) != 3:
                raise DataError(f"{path}:{n}: expected 'query-id<TAB>corpus-id<TAB>score', got {line.strip()!r:.80}")
            try:
                grade = int(float(cols[2]))
            except ValueError:
                raise DataError(f"{path}:{n}: the score {cols[2]!r} is not a number") from None
            qrels.setdefault(cols[0], {})[cols[1]] = grade
    return qrels


def digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def read_dataset(path: str | Path, split: str | None = None) -> Dataset:
    """A BEIR-layout folder or an image-document folder (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a directory")
    tsvs = sorted((path / "qrels").glob("*.tsv"))
    if split is None:
        split = "test" if (path / "qrels" / "test.tsv").is_file() else (tsvs[0].stem if len(tsvs) == 1 else None)
        if split is None:
            names = [t.stem for t in tsvs]
            raise DataError(f"{path / 'qrels'}: choose a split with --split (found {names or 'no .tsv files'})")
    qrels_file = path / "qrels" / f"{split}.tsv"
    for needed in (path / "queries.jsonl", qrels_file):
        if not needed.is_file():
            raise DataError(f"{needed}: missing (a BEIR-layout folder needs queries.jsonl and qrels/<split>.tsv)")
    corpus: list[tuple[str, dict]] = []
    files: list[Path] = []
    if (path / "corpus.jsonl").is_file():
        files.append(path / "corpus.jsonl")
        for n, row in read_jsonl(path / "corpus.jsonl"):
            if "image" in row:
                image = path / str(row["image"])
                if not image.is_file():
                    raise DataError(f"{path / 'corpus.jsonl'}:{n}: image {row['image']!r} is not a file in {path}")
                corpus.append((str(row["_id"]), {"image": image}))
                files.append(image)
                continue
            title, text = row.get("title") or "", row.get("text") or ""
            corpus.append((str(row["_id"]), {"text": f"{title} {text}" if title else text}))
    elif (path / "images").is_dir():
        images = sorted(p for p in (path / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        corpus = [(p.stem, {"image": p}) for p in images]
        files += images
    else:
        raise DataError(f"{path}: neither corpus.jsonl nor an images/ folder")
    if not corpus:
        raise DataError(f"{path}: the corpus is empty")
    ids = [i for i, _ in corpus]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{path}: document id {dup!r} appears twice")
    queries = {str(row["_id"]): str(row.get("text") or "") for _, row in read_jsonl(path / "queries.jsonl")}
    qrels = read_qrels(qrels_file)
    data = Dataset(path, split, corpus, queries, qrels, digest(files), digest([path / "queries.jsonl"]))
    data.skipped = {
        "no relevant document": sum(1 for q in qrels if q in queries and not relevant(qrels[q])),
        "not in queries.jsonl": sum(1 for q in qrels if q not in queries),
    }
    return data


def relevant(judged: dict[str, int]) -> set[str]:
    return {d for d, g in judged.items() if g >= 1}


# ---- ranking and metrics ------------------------------------------------------------------------------------------


def ranking(scores: dict[str, float], depth: int | None = None) -> list[str]:
    """Document ids by decreasing score, ties by decreasing id (trec_eval's order), cut at `depth`."""
    order = sorted(scores, reverse=True)  # ids, decreasing
    order.sort(key=lambda d: -scores[d])  # stable: equal scores keep the decreasing-id order
    return order if depth is None else order[:depth]


def rank_matrix(scores: torch.Tensor, doc_ids: list[str], depth: int) -> list[list[str]]:
    """(Q, D) scores -> per query the top `depth` document ids in trec_eval's order. Only the candidates that can
    reach the top (score >= the depth-th best, ties included) are sorted."""
    s = scores.double().cpu().numpy()
    depth = min(depth, s.shape[1])
    out = []
    for row in s:
        cut = np.partition(row, -depth)[-depth]
        candidates = np.flatnonzero(row >= cut)
        out.append(ranking({doc_ids[j]: float(row[j]) for j in candidates}, depth))
    return out


def ndcg(ranked: list[str], judged: dict[str, int], k: int) -> float:
    dcg = sum(max(judged.get(d, 0), 0) / math.log2(r + 1) for r, d in enumerate(ranked[:k], 1))
    ideal = sorted((g for g in judged.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(r + 1) for r, g in enumerate(ideal, 1))
    return dcg / idcg if idcg > 0 else 0.0


def recall(ranked: list[str], judged: dict[str, int], k: int) -> float:
    rel = relevant(judged)
    return len(rel.intersection(ranked[:k])) / len(rel) if rel else 0.0


def mrr(ranked: list[str], judged: dict[str, int], k: int) -> float:
    return next((1.0 / r for r, d in enumerate(ranked[:k], 1) if judged.get(d, 0) >= 1), 0.0)


def evaluate_run(
    run: dict[str, list[str]], qrels: dict[str, dict[str, int]], ks: Sequence[int] = DEFAULT_KS
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Ranked ids per query -> (mean metrics, per-query metrics) over the queries of `run` with a relevant
    document in `qrels` (the others are skipped)."""
    functions = {"ndcg": ndcg, "recall": recall, "mrr": mrr}
    per_query = {
        q: {f"{m}@{k}": functions[m](ranked, qrels[q], k) for m in METRICS for k in ks}
        for q, ranked in run.items()
        if q in qrels and relevant(qrels[q])
    }
    names = [f"{m}@{k}" for m in METRICS for k in ks]
    mean = {n: (sum(v[n] for v in per_query.values()) / len(per_query) if per_query else 0.0) for n in names}
    return mean, per_query


# ---- embedding, with a cache --------------------------------------------------------------------------------------


def model_key(model_name: str) -> dict:
    """What identifies the weights: the config files' contents and the weight and adapter files' sizes and
    modification times (hashing 7.5 GB of weights on every run would cost more than it saves)."""
    from ..model.loading import resolve

    path = resolve(model_name, local_files_only=True) if not Path(model_name).is_dir() else Path(model_name)
    files = sorted(p for p in [*path.glob("*.safetensors"), *path.glob("adapters/*.safetensors")])
    return {
        "model": str(path.resolve()),
        "config": digest([path / "config.json", path / "adapters" / "adapter_config.json"]),
        "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
    }


class Cache:
    """Vectors on disk under a key of (model, task, dtype, data, role, head, max_pixels): one safetensors file
    per key, written atomically; a file whose recorded key differs (a hash collision, a hand edit) is ignored."""

    def __init__(self, directory: str | Path | None):
        self.directory = None if directory is None else Path(directory)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)

    def file(self, key: dict) -> Path:
        return self.directory / (
            hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32] + ".safetensors"
        )

    def get(self, key: dict):
        if self.directory is None or not self.file(key).is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(self.file(key)), framework="pt") as f:
            if json.loads(f.metadata().get("key", "null")) != json.loads(json.dumps(key, sort_keys=True)):
                return None
            vectors = f.get_tensor("vectors")
            lengths = f.get_tensor("lengths").tolist() if "lengths" in f.keys() else None
        return vectors if lengths is None else list(vectors.split(lengths))

    def put(self, key: dict, vectors) -> None:
        if self.directory is None:
            return
        from safetensors.torch import save_file

        from .common import atomic_write

        tensors = (
            {"vectors": vectors.contiguous()}
            if isinstance(vectors, torch.Tensor)
            else {
                "vectors": torch.cat(vectors).contiguous(),
                "lengths": torch.tensor([len(v) for v in vectors]),
            }
        )
        meta = {"key": json.dumps(key, sort_keys=True)}
        atomic_write(self.file(key), lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def embed(
    model,
    inputs: list[dict],
    task: str,
    prompt_name: str,
    multivector: bool,
    batch_size: int | None = None,
    max_pixels: int | None = None,
    progress: str | None = None,
    chunk: int = 64,
):
    """Inputs -> single vectors (N, D) or a list of (L_i, P) multi-vectors, `chunk` inputs at a time (images are
    read when their chunk comes), with a progress bar named `progress` (None: none)."""
    from tqdm import tqdm

    out = []
    bar = tqdm(total=len(inputs), desc=progress, unit="item", disable=progress is None, file=sys.stderr)
    for i in range(0, len(inputs), chunk):
        part = inputs[i : i + chunk]
        items = model.prepare(part, task, prompt_name, max_pixels=max_pixels, name=progress or "inputs")
        got = model.encode_items(items, batch_size, return_multivector=multivector)
        out += list(got) if multivector else [got]
        bar.update(len(part))
    bar.close()
    if multivector:
        return out
    return torch.cat(out) if out else torch.empty(0, model.config.text_config.hidden_size)


def scores_for(queries, documents, multivector: bool, dim: int | None) -> torch.Tensor:
    """(Q, D) cosine of single vectors (Matryoshka-truncated to `dim` and renormalised) or MaxSim."""
    from ..model.heads import matryoshka
    from .scoring import maxsim

    if multivector:
        return maxsim(queries, documents)
    q, d = matryoshka(queries.float(), dim), matryoshka(documents.float(), dim)
    return q @ d.T


def evaluate(
    model,
    data: Dataset,
    task: str = "retrieval",
    multivector: bool = False,
    dim: int | None = None,
    ks: Sequence[int] = DEFAULT_KS,
    cache: Cache | None = None,
    model_name: str | None = None,
    batch_size: int | None = None,
    max_pixels: int | None = None,
    quiet: bool = True,
) -> dict:
    """The whole run: the corpus and the evaluated queries embedded (or read from the cache), ranked, scored."""
    from ..model.heads import head_for

    head_for(multivector, dim, model.config.matryoshka_dims)  # the dim / multivector rules, before any work
    model.config.tasks_for(task, 1)
    if not ks or any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"k must be positive integers, got {list(ks)}")
    cache = cache or Cache(None)
    qids = [q for q in data.qrels if q in data.queries and relevant(data.qrels[q])]
    if not qids:
        raise DataError(f"{data.path}: no query of qrels/{data.split}.tsv has a relevant document in queries.jsonl")
    common = {
        **(model_key(model_name) if model_name and cache.directory else {"model": str(model_name)}),
        "task": task,
        "dtype": str(model.dtype).replace("torch.", ""),
        "head": "multi" if multivector else "single",
        "max_pixels": max_pixels,
    }
    vectors = {}
    for role, inputs, prompt, data_digest in (
        ("corpus", [x for _, x in data.corpus], "passage", data.corpus_digest),
        ("queries", [{"text": data.queries[q]} for q in qids], "query", data.queries_digest + ",".join(qids)),
    ):
        key = {**common, "role": role, "data": hashlib.sha256(data_digest.encode()).hexdigest()}
        got = cache.get(key)
        if got is None:
            got = embed(model, inputs, task, prompt, multivector, batch_size, max_pixels, None if quiet else role)
            cache.put(key, got)
        vectors[role] = got
    scores = scores_for(vectors["queries"], vectors["corpus"], multivector, dim)
    ranked = rank_matrix(scores, [i for i, _ in data.corpus], max(ks))
    mean, per_query = evaluate_run(dict(zip(qids, ranked)), data.qrels, ks)
    return {
        **mean,
        "settings": {
            "model": str(model_name),
            "task": task,
            "dtype": common["dtype"],
            "data": str(data.path),
            "split": data.split,
            "mode": "multivector" if multivector else "single",
            "dim": None if multivector else (dim or model.config.text_config.hidden_size),
            "k": list(ks),
        },
        "counts": {"queries": len(qids), "documents": len(data.corpus), "skipped_queries": data.skipped},
        "per_query": per_query,
    }


def table(result: dict) -> str:
    s, c = result["settings"], result["counts"]
    skipped = ", ".join(f"{n} {why}" for why, n in c["skipped_queries"].items() if n)
    mode = "multi-vector MaxSim" if s["mode"] == "multivector" else f"single vectors, {s['dim']}-d"
    lines = [
        f"{s['data']} ({s['split']}): {c['queries']} queries{f' (skipped: {skipped})' if skipped else ''}, "
        f"{c['documents']} documents; task {s['task']}, {mode}, {s['dtype']}",
        f"{'k':>5} {'nDCG@k':>8} {'Recall@k':>9} {'MRR@k':>8}",
    ]
    for k in s["k"]:
        lines.append(f"{k:>5} {result[f'ndcg@{k}']:>8.4f} {result[f'recall@{k}']:>9.4f} {result[f'mrr@{k}']:>8.4f}")
    return "\n".join(lines)


def main(args) -> None:
    """`jina-v4 eval` (cli.py parses the arguments)."""
    from .common import atomic_write, loaded_model

    data = read_dataset(args.data, args.split)
    model = loaded_model(args.model, args.device, args.dtype, args.quiet)
    result = evaluate(
        model,
        data,
        args.task,
        args.multivector,
        args.dim,
        args.k,
        Cache(args.cache),
        str(args.model),
        args.batch_size,
        args.max_pixels,
        args.quiet,
    )
    print(table(result))
    if args.output:
        atomic_write(Path(args.output), lambda tmp: tmp.write_text(json.dumps(result, indent=2) + "\n"))
