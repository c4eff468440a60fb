"""A corpus embedded on a Ray cluster with Ray Data, behind `jina-v4 embed --ray`.

`Embedder` is the callable class for `Dataset.map_batches`: a pool of actors, each loading one JinaV4 in
`__init__`, called on batches of rows (an id, optionally the global index, and a text or an image: bytes or a
path). It returns Arrow:
    id         as given (row numbers, strings, ...)
    embedding  single vectors: fixed_size_list<float32>[D]; multi-vectors: list<fixed_size_list<float32>[128]>
               (one 128-d vector per token); null for a row that was skipped
    skipped    with on_error="skip" only: struct<index, input, error>, null for a row that was embedded
`embed_corpus` runs a corpus (corpus.py reads it: jsonl, parquet, image directories, text files) through an actor
pool into parquet files of `id` and `embedding` (skipped rows into a report); `read_vectors` loads them.
Scheduling, retries, progress: Ray's.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data
import torch
from ray.data.block import BlockAccessor

from ..model import JinaV4
from ..model.heads import head_for
from ..model.loading import CONFIG_FILES, read_configs, resolve
from ..model.processing import MAX_TEXT_TOKENS, preview
from ..pipeline import collect, encode
from . import corpus
from .common import error_policy, write_jsonl


class EmbedError(ValueError):
    """A bad input (under on_error="fail"), file or option: the message names it (an input by its index and id)
    and why."""


class Embedder:
    """One JinaV4 per actor; called on batches (a pyarrow Table or a dict of arrays) of `id_column` and
    `text_column` and/or `image_column` (bytes, a path or an http(s) URL); each row holds one of the two. An
    `index_column` (the global index corpus.py gives each input), when the batches have one, names inputs in
    messages and reports."""

    def __init__(
        self,
        model: str,
        task: str = "retrieval",
        prompt_name: str | None = None,
        multivector: bool = False,
        truncate_dim: int | None = None,
        max_pixels: int | None = None,
        max_length: int | None = None,
        dtype: str | None = None,
        device: str | None = None,
        on_error: str = "fail",
        batch_size: int | None = None,
        text_column: str = "text",
        image_column: str = "image",
        id_column: str = "id",
        deterministic: bool = False,
        index_column: str = "index",
    ):
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error={on_error!r} is not 'fail' or 'skip'")
        self.model = JinaV4.from_pretrained(model, device=device, dtype=dtype)
        self.model.task = task
        self.prompt_name, self.max_pixels, self.on_error = prompt_name, max_pixels, on_error
        self.max_length = max_length or MAX_TEXT_TOKENS
        self.head = head_for(multivector, truncate_dim, self.model.config.matryoshka_dims)
        self.dim = truncate_dim or self.model.config.text_config.hidden_size
        self.batch_size, self.deterministic = batch_size, deterministic
        self.multivector, self.text_column, self.image_column = multivector, text_column, image_column
        self.id_column, self.index_column = id_column, index_column

    def __call__(self, batch: pa.Table | dict) -> pa.Table:
        cols = batch.to_pydict() if isinstance(batch, pa.Table) else {k: list(v) for k, v in batch.items()}
        ids, none = cols[self.id_column], [None] * len(cols[self.id_column])
        texts, images = cols.get(self.text_column, none), cols.get(self.image_column, none)
        inputs = [{"text": t} if i is None else {"image": i} for t, i in zip(texts, images)]
        items = self.model.prepare(
            inputs, self.model.task, self.prompt_name, self.max_length, self.max_pixels, errors="return"
        )
        for j, (t, i) in enumerate(zip(texts, images)):
            if t is not None and i is not None or t is None and i is None:
                items[j] = ValueError(
                    f"a row holds a {self.text_column!r} or an {self.image_column!r}, "
                    f"{'not both' if t is not None else 'and this one has neither'}"
                )
        with torch.inference_mode():
            results = encode(self.model, items, self.head, self.batch_size, self.deterministic, errors="return")
        labels = [
            f"<{len(i)} bytes>" if isinstance(i, bytes) else str(i if t is None else t) for t, i in zip(texts, images)
        ]
        index = cols.get(self.index_column, none)
        names = [f"id {i!r}" if k is None else corpus.name(k, i) for k, i in zip(index, ids)]
        skipped = error_policy(results, names, labels, self.on_error, EmbedError)
        skipped = [
            None if r is None else {**r, "index": k, "input": preview(r["input"], 200)} for r, k in zip(skipped, index)
        ]
        ok = [j for j, s in enumerate(skipped) if s is None]
        vecs = collect([results[j] for j in ok], self.multivector, False, self.dim, self.model.dtype)
        out = {"id": pa.array(ids), "embedding": self.vector_column(vecs, ok, len(ids))}
        if self.on_error == "skip":
            record = pa.struct([("index", pa.int64()), ("input", pa.string()), ("error", pa.string())])
            out["skipped"] = pa.array(skipped, record)
        return pa.table(out)

    def vector_column(self, vecs, ok: list[int], n: int) -> pa.Array:
        """The vectors of rows `ok` as an Arrow column of n rows, null elsewhere."""
        mask = None if len(ok) == n else pa.array(~np.isin(np.arange(n), ok))
        if not self.multivector:  # (len(ok), D) -> n fixed-size lists
            full = np.zeros((n, vecs.shape[1]), dtype=vecs.numpy().dtype)
            full[ok] = vecs.numpy()
            return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), vecs.shape[1], mask=mask)
        lengths = np.zeros(n, dtype=np.int32)  # len(ok) x (L_i, P) -> n lists of L_i fixed-size lists
        lengths[ok] = [len(v) for v in vecs]
        flat = np.concatenate([v.numpy().reshape(-1) for v in vecs] or [np.zeros(0, np.float32)])
        tokens = pa.FixedSizeListArray.from_arrays(pa.array(flat), self.model.config.multi_vector_projector_dim)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        return pa.ListArray.from_arrays(offsets, tokens, mask=mask)


class VectorSink(ray.data.Datasink):
    """Parquet files of `id` and `embedding` in `directory`; rows with a `skipped` record are left out and
    their records collected on the driver (`self.skipped`). Each write task writes one file named after its
    task index, under a temporary name first, so a retried task replaces its file instead of adding one."""

    def __init__(self, directory: str):
        self.directory, self.skipped, self.rows = directory, [], 0

    def write(self, blocks, ctx) -> tuple[int, list[dict]]:
        tables = [t for t in (BlockAccessor.for_block(b).to_arrow() for b in blocks) if t.num_rows]
        if not tables:
            return 0, []
        table, skipped = pa.concat_tables(tables), []
        if "skipped" in table.column_names:
            bad = table["skipped"].is_valid()
            rows = table.filter(bad)
            skipped = [
                {"index": s.pop("index"), "id": i, **s}
                for i, s in zip(rows["id"].to_pylist(), rows["skipped"].to_pylist())
            ]
            table = table.filter(pc.invert(bad)).drop_columns(["skipped"])
        if table.num_rows:
            path = os.path.join(self.directory, f"part-{ctx.task_idx:05d}.parquet")
            pq.write_table(table, path + ".tmp")
            os.replace(path + ".tmp", path)
        return table.num_rows, skipped

    def on_write_complete(self, result) -> None:
        self.rows = sum(n for n, _ in result.write_returns)
        self.skipped = [r for _, s in result.write_returns for r in s]


def read_corpus(
    inputs: list[str], rows: int, fields: tuple[str, str, str] = corpus.FIELDS, on_error: str = "fail"
) -> tuple[ray.data.Dataset, int, list[dict]]:
    """A corpus (corpus.py) -> (a dataset of index, id, text and/or image in blocks of about `rows` rows, the number
    of rows, the records of rows skipped while reading). jsonl and text files and image directories are read on
    the driver (texts and paths: the ids and indices are fixed before anything is distributed; the actors open
    the images); parquet files are listed from their footers and read a row group per task, so image bytes never
    pass through the driver."""
    paths = [Path(p) for p in inputs]
    if any(p.suffix == ".parquet" for p in paths):
        if not all(p.suffix == ".parquet" and p.is_file() for p in paths):
            raise EmbedError(f"{', '.join(inputs)}: parquet files go alone: no other kind of --input beside them")
        pieces, n, _ = corpus.parquet_pieces(paths, fields)
        read = lambda batch: corpus.read_row_group({k: v[0] for k, v in batch.items()}, fields)  # noqa: E731
        ds = ray.data.from_items(pieces).map_batches(read, batch_size=1)
        return ds.repartition(target_num_rows_per_block=rows), n, []
    try:
        found = corpus.read([], inputs, None, fields, on_error)
    except corpus.CorpusError as e:
        raise EmbedError(str(e)) from None
    good = [r for r in found if r.error is None]
    if len({type(r.id) for r in good}) > 1:
        raise EmbedError(
            f"{', '.join(inputs)}: the ids are not all of one type (ints and paths?): a parquet column holds one; "
            "give every row an id, or embed image directories apart"
        )
    table = pa.table(
        {
            "index": pa.array([r.index for r in good], pa.int64()),
            "id": pa.array([r.id for r in good]),
            "text": pa.array([r.input.get("text") for r in good], pa.string()),
            "image": pa.array([r.input.get("image") for r in good], pa.string()),
        }
    )
    blocks = [table.slice(i, rows) for i in range(0, table.num_rows, rows)] or [table]
    return ray.data.from_arrow(blocks), len(found), [r.record() for r in found if r.error is not None]


def check_options(model: str, kw: dict) -> None:
    """What would fail in every actor fails here, once: the model (its config files), task, truncate_dim."""
    config = read_configs(resolve(model, files=CONFIG_FILES))[0]
    try:
        config.tasks_for(kw.get("task", "retrieval"), 1)
        head_for(kw.get("multivector", False), kw.get("truncate_dim"), config.matryoshka_dims)
    except ValueError as e:
        raise EmbedError(str(e)) from None


def embed_corpus(
    inputs: list[str],
    output: str,
    model: str,
    *,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float | None = None,
    rows: int = 1000,
    report: str | None = None,
    fields: tuple[str, str, str] = ("id", "text", "image"),
    cls: type = Embedder,
    **embedder_kwargs,
) -> dict:
    """Read `inputs`, embed them on a pool of `cls` actors (kwargs as Embedder's; default: 1 GPU each, one per
    GPU, or one) into output/part-*.parquet, skipped rows into `report` (output/skipped.jsonl). Ray must run."""
    out, start = Path(output), time.perf_counter()
    if out.exists() and (not out.is_dir() or any(out.glob("part-*.parquet"))):
        raise EmbedError(f"{output} holds an earlier run's parquet files (or is a file); use a new directory")
    gpus, cpus = ray.cluster_resources().get("GPU", 0), ray.cluster_resources().get("CPU", 1)
    gpus_per_actor = (1 if gpus else 0) if gpus_per_actor is None else gpus_per_actor
    actors = actors or (max(1, int(gpus // gpus_per_actor)) if gpus_per_actor else 1)
    if cpus_per_actor is None:  # one CPU stays free, or reads and writes wait forever behind actors holding all
        cpus_per_actor = min(max(cpus - 1, 0) / actors, 1 if gpus_per_actor else cpus)
    embedder_kwargs["device"] = embedder_kwargs.get("device") or ("cuda" if gpus_per_actor else "cpu")
    check_options(model, embedder_kwargs)
    ds, n, skipped = read_corpus(inputs, rows, fields, embedder_kwargs.get("on_error", "fail"))
    out.mkdir(parents=True, exist_ok=True)
    # Ray Data restarts an actor that dies and retries its batches (max_restarts, max_task_retries: -1)
    ds = ds.map_batches(
        cls,
        fn_constructor_kwargs={"model": model, **embedder_kwargs},
        batch_size=rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
    )
    sink, found = VectorSink(str(out.resolve())), None
    try:
        ds.write_datasink(sink)
    except Exception as e:  # Ray hands an actor's error on as text inside its own
        found = re.search(r"EmbedError: (.+)", str(e))
        if not found:
            raise
    if found:  # reference cycles in the failed run hold its actors, and their CPUs, until collected
        gc.collect()
        raise EmbedError(found.group(1))
    skipped = sorted(skipped + sink.skipped, key=lambda r: (r["index"] is None, r["index"] or 0, str(r["id"])))
    if sink.rows + len(skipped) != n:  # Ray's retries must neither lose nor repeat a row
        raise EmbedError(f"{n} rows were read but {sink.rows} written and {len(skipped)} skipped")
    if skipped:
        write_jsonl(Path(report or out / "skipped.jsonl"), skipped)
    return {"embedded": sink.rows, "skipped": len(skipped), "actors": actors, "seconds": time.perf_counter() - start}


def read_vectors(directory: str | Path) -> tuple[list, np.ndarray | list[np.ndarray]]:
    """An output directory -> (ids, vectors): single vectors as one (N, D) array, multi-vectors as a list of
    (L_i, 128) arrays; files in name order, rows in file order."""
    tables = [pq.read_table(f) for f in sorted(Path(directory).glob("part-*.parquet"))]
    if not tables:
        return [], np.zeros((0, 0), np.float32)
    table = pa.concat_tables(tables)
    emb = table["embedding"].combine_chunks()
    if pa.types.is_fixed_size_list(emb.type):
        return table["id"].to_pylist(), emb.values.to_numpy().reshape(len(emb), emb.type.list_size)
    offsets, flat = emb.offsets.to_numpy(), emb.values.values.to_numpy().reshape(-1, emb.type.value_type.list_size)
    return table["id"].to_pylist(), [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def run(args) -> None:
    """`jina-v4 embed --ray [ADDRESS] --input ... -o DIR`, on the options cli.py parses."""
    if args.texts or args.image or not args.input or not args.output or args.format:
        raise EmbedError(
            "with --ray, give --input files (.jsonl, .parquet, texts) or image directories and -o DIR; "
            "the output is parquet (no --format)"
        )
    level, started, start = logging.ERROR if args.quiet else logging.INFO, not ray.is_initialized(), time.perf_counter()
    if started:  # no address: a local Ray (or RAY_ADDRESS's cluster); "auto", ray://head:10001: that cluster
        ray.init(address=args.ray or None, logging_level=level)
    ray_seconds = time.perf_counter() - start
    ray.data.DataContext.get_current().enable_progress_bars = not args.quiet
    logging.getLogger("ray.data").setLevel(level)
    try:
        r = embed_corpus(
            args.input,
            args.output,
            str(args.model),
            actors=args.actors,
            gpus_per_actor=args.gpus_per_actor,
            rows=args.shard_size,
            report=args.report,
            fields=("id", args.text_field, "image"),
            task=args.task,
            prompt_name=args.prompt_name,
            multivector=args.multivector,
            truncate_dim=args.truncate_dim,
            max_pixels=args.max_pixels,
            max_length=args.max_length,
            dtype=args.dtype,
            device=args.device,
            on_error=args.on_error,
            batch_size=args.batch_size,
            deterministic=args.deterministic,
        )
    finally:
        if started:
            ray.shutdown()
    if not args.quiet:
        skipped = f"; {r['skipped']} skipped (see the report)" if r["skipped"] else ""
        print(
            f"embedded {r['embedded']} items on {r['actors']} actor{'s' * (r['actors'] > 1)} in {r['seconds']:.1f} s "
            f"(Ray started in {ray_seconds:.1f} s){skipped}",
            file=sys.stderr,
        )
