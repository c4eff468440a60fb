"""`jina-v4 embed --ray` and `jina_v4.apps.ray_data` on a local Ray (2 CPUs, one Ray for the module): the parquet
output equals the single-process API and holds every input once, an actor killed mid-run is restarted and its
batch retried without loss or duplicates, and bad inputs fail the job or are skipped and reported."""

import gc
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from jina_v4.apps.cli import main
from jina_v4.apps.ray_data import Embedder, EmbedError, embed_corpus, read_vectors

pytestmark = pytest.mark.slow

TEXTS = [f"document {i}: " + "words and more words " * (1 + i % 4) for i in range(10)]
DIE_AT = 5  # the id whose batch kills its actor


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    tests = str(Path(__file__).parent)  # workers import this module (DyingEmbedder) by name
    path = os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        logging_level=logging.WARNING,
        runtime_env={"env_vars": {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def collect_garbage():
    """A failed run's actors, and the CPUs they hold, stay referenced from what pytest kept of the failure (a
    traceback) until reference cycles are collected: collect them before each test."""
    gc.collect()


@pytest.fixture(scope="module")
def ckpt(checkpoints):
    return str(checkpoints["gqa4-single"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """10 texts and 3 images (relative paths, as a corpus file names them), one input per line."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    (d / "pages").mkdir()
    for name, (h, w) in [("a.png", (80, 60)), ("b.jpg", (40, 120)), ("c.png", (64, 64))]:
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / "pages" / name)
    rows = [{"text": t} for t in TEXTS[:5]] + [{"image": f"pages/{n}"} for n in ("a.png", "b.jpg", "c.png")]
    rows += [{"text": t} for t in TEXTS[5:]]
    (d / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    inputs = [{"image": str(d / r["image"])} if "image" in r else r for r in rows]
    return d, inputs


def expected(models, inputs, multivector):
    return models("gqa4-single").encode(inputs, task="retrieval", return_multivector=multivector)


def assert_equal_vectors(got, want, multivector, tol):
    """tol: batch_tol (conftest.py): one implementation in other batches."""
    if multivector:
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == tuple(w.shape) and np.abs(g - w.numpy()).max() <= tol
    else:
        assert got.shape == tuple(want.shape) and np.abs(got - want.numpy()).max() <= tol


def in_id_order(ids, vectors):
    order = np.argsort(ids)
    return sorted(ids), [vectors[i] for i in order] if isinstance(vectors, list) else vectors[order]


def as_parquet(inputs, directory):
    """The corpus as two parquet files of several row groups each, images as bytes, no id column."""
    texts = [x.get("text") for x in inputs]
    images = [Path(x["image"]).read_bytes() if "image" in x else None for x in inputs]
    table = pa.table({"text": texts, "image": pa.array(images, pa.binary())})
    pq.write_table(table.slice(0, 7), directory / "a.parquet", row_group_size=3)
    pq.write_table(table.slice(7), directory / "b.parquet", row_group_size=4)
    return [str(directory / "a.parquet"), str(directory / "b.parquet")]


@pytest.mark.parametrize("multivector", [False, True], ids=["single-jsonl", "multi-parquet"])
def test_equals_the_single_process_api(ckpt, models, batch_tol, corpus, tmp_path, multivector):
    """Texts and images over 2 actors in batches of 3: ids are the row numbers (over both files for parquet),
    each exactly once, and the vectors those of `model.encode` in one process."""
    d, inputs = corpus
    files = as_parquet(inputs, tmp_path) if multivector else [str(d / "corpus.jsonl")]
    r = embed_corpus(files, str(tmp_path / "out"), ckpt, actors=2, rows=3, multivector=multivector, dtype="float32")
    ids, vectors = in_id_order(*read_vectors(tmp_path / "out"))
    assert ids == list(range(len(inputs)))
    assert r["embedded"] == len(inputs) and r["skipped"] == 0 and len(list((tmp_path / "out").glob("*.parquet"))) > 1
    assert_equal_vectors(vectors, expected(models, inputs, multivector), multivector, batch_tol("gqa4-single"))
    emb = pq.read_table(next((tmp_path / "out").glob("*.parquet")))["embedding"].type
    assert emb == (pa.list_(pa.list_(pa.float32(), 24)) if multivector else pa.list_(pa.float32(), 64))


class DyingEmbedder(Embedder):
    """Kills its own process (as a crash or an out-of-memory kill would) on the batch holding id DIE_AT, once:
    the marker file says it has happened, so the restarted actor's retry of that batch goes through."""

    def __init__(self, *args, marker: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.marker = Path(marker)
        with open(self.marker.with_suffix(".starts"), "a") as f:
            f.write(f"{os.getpid()}\n")

    def __call__(self, batch):
        if DIE_AT in batch["id"].to_pylist() and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os._exit(1)
        return super().__call__(batch)


def test_killed_actor_is_restarted_and_nothing_is_lost_or_repeated(ckpt, models, batch_tol, corpus, tmp_path):
    d, inputs = corpus
    marker = tmp_path / "died"
    embed_corpus(
        [str(d / "corpus.jsonl")],
        str(tmp_path / "out"),
        ckpt,
        actors=2,
        rows=2,
        dtype="float32",
        cls=DyingEmbedder,
        marker=str(marker),
    )
    starts = marker.with_suffix(".starts").read_text().split()
    assert marker.exists() and marker.read_text() in starts, "an actor died on its batch"
    assert len(starts) == 3, "2 actors, and the dead one restarted once"
    ids, vectors = in_id_order(*read_vectors(tmp_path / "out"))
    assert ids == list(range(len(inputs)))  # nothing lost, nothing twice
    assert_equal_vectors(vectors, expected(models, inputs, False), False, batch_tol("gqa4-single"))


@pytest.fixture(scope="module")
def bad_corpus(corpus):
    d, _ = corpus
    rows = [{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS[:4])]
    rows += [
        {"id": "missing", "image": "pages/missing.png"},
        {"id": "not-an-image", "image": "corpus.jsonl"},
        {"id": "both", "text": "x", "image": "pages/a.png"},
        {"id": "number", "text": 7},
        {"id": "t4", "text": TEXTS[4]},
        {"id": "surrogate", "text": "bad \ud800 text"},
    ]
    (d / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d / "bad.jsonl"


def test_on_error_skip_leaves_bad_inputs_out_and_reports_them(ckpt, models, batch_tol, bad_corpus, tmp_path):
    r = embed_corpus([str(bad_corpus)], str(tmp_path / "out"), ckpt, actors=1, rows=3, on_error="skip")
    ids, vectors = read_vectors(tmp_path / "out")
    assert sorted(ids) == ["t0", "t1", "t2", "t3", "t4"] and r["skipped"] == 5
    ref = models("gqa4-single").encode(TEXTS[:5], task="retrieval")
    assert_equal_vectors(in_id_order(ids, vectors)[1], ref, False, batch_tol("gqa4-single"))
    report = {x["id"]: x for x in map(json.loads, (tmp_path / "out" / "skipped.jsonl").read_text().splitlines())}
    assert sorted(report) == ["both", "missing", "not-an-image", "number", "surrogate"]
    assert "FileNotFoundError" in report["missing"]["error"] and report["missing"]["input"].endswith("missing.png")
    assert "UnidentifiedImageError" in report["not-an-image"]["error"]
    assert "not both" in report["both"]["error"] and "int, not str" in report["number"]["error"]
    assert "lone surrogate" in report["surrogate"]["error"]


def test_default_ids_survive_a_line_skipped_while_reading(ckpt, models, batch_tol, corpus, tmp_path):
    """Without ids, the ids are the row numbers: a line the reader skips (line 3: a text that is not a str) keeps
    its number, in the report, and the rows after it keep theirs."""
    d, _ = corpus
    rows = [{"text": t} for t in TEXTS[:2]] + [{"text": 7}] + [{"text": t} for t in TEXTS[2:6]]
    (d / "no-ids.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = embed_corpus([str(d / "no-ids.jsonl")], str(tmp_path / "out"), ckpt, actors=1, rows=3, on_error="skip")
    ids, vectors = read_vectors(tmp_path / "out")
    assert sorted(ids) == [0, 1, 3, 4, 5, 6] and len(set(ids)) == len(ids) and r["skipped"] == 1
    report = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [x["id"] for x in report] == [2] and "int, not str" in report[0]["error"]
    ref = models("gqa4-single").encode([rows[i]["text"] for i in sorted(ids)], task="retrieval")
    assert_equal_vectors(in_id_order(ids, vectors)[1], ref, False, batch_tol("gqa4-single"))  # each id its row


def test_on_error_fail_names_the_input(ckpt, bad_corpus, tmp_path):
    lines = bad_corpus.read_text().splitlines()
    only_embedder_errors = tmp_path / "bad.jsonl"  # the reader's own checks (both, int, surrogate) run first otherwise
    only_embedder_errors.write_text("\n".join(lines[:5]).replace("pages/", str(bad_corpus.parent / "pages") + "/"))
    with pytest.raises(EmbedError, match=r"^input 4, id 'missing' \(.*missing\.png\): FileNotFoundError"):
        embed_corpus([str(only_embedder_errors)], str(tmp_path / "out"), ckpt, actors=1, rows=2)
    with pytest.raises(EmbedError, match=r"^.*bad\.jsonl:7: a row holds a 'text' or an 'image', not both"):
        embed_corpus([str(bad_corpus)], str(tmp_path / "out2"), ckpt, actors=1, rows=2)


def test_plain_and_ray_read_the_same_corpus(ckpt, batch_tol, bad_corpus, tmp_path):
    """One reader: `embed --input` in one process and `embed --ray` take the same jsonl (ids, image rows, bad lines),
    embed the same inputs and report the same ones skipped, each by its index and id."""
    common = ["embed", "--input", str(bad_corpus), "--model", ckpt, "--on-error", "skip", "--quiet"]
    assert main([*common, "-o", str(tmp_path / "plain.jsonl")]) == 0
    assert main([*common, "--ray", "-o", str(tmp_path / "ray"), "--actors", "1", "--shard-size", "3"]) == 0
    plain = sorted(
        (json.loads(line) for line in (tmp_path / "plain.jsonl").read_text().splitlines()), key=lambda r: r["id"]
    )
    ids, vectors = in_id_order(*read_vectors(tmp_path / "ray"))
    assert [r["id"] for r in plain] == ids == ["t0", "t1", "t2", "t3", "t4"]
    assert np.abs(np.array([r["embedding"] for r in plain]) - vectors).max() <= batch_tol("gqa4-single")
    reports = [
        [json.loads(line) for line in path.read_text().splitlines()]
        for path in (tmp_path / "plain.jsonl.skipped.jsonl", tmp_path / "ray" / "skipped.jsonl")
    ]
    assert reports[0] == reports[1]
    assert [(r["index"], r["id"]) for r in reports[0]] == [
        (4, "missing"),
        (5, "not-an-image"),
        (6, "both"),
        (7, "number"),
        (9, "surrogate"),
    ]


def test_cli_on_an_image_directory(ckpt, models, batch_tol, corpus, tmp_path, capsys):
    """`jina-v4 embed --ray` in-process: it joins the running Ray instead of starting one."""
    d, inputs = corpus
    out = tmp_path / "out"
    assert (
        main(
            [
                "embed",
                "--ray",
                "--input",
                str(d / "pages"),
                "-o",
                str(out),
                "--model",
                ckpt,
                "--multivector",
                "--actors",
                "1",
                "--shard-size",
                "2",
                "--max-pixels",
                "3000",
            ]
        )
        == 0
    )
    ids, vectors = read_vectors(out)
    images = sorted(str(p) for p in (d / "pages").iterdir())
    assert sorted(ids) == images
    ref = models("gqa4-single").encode_image(images, task="retrieval", return_multivector=True, max_pixels=3000)
    assert_equal_vectors(in_id_order(ids, vectors)[1], ref, True, batch_tol("gqa4-single"))
    assert "embedded 3 items on 1 actor in " in capsys.readouterr().err
    assert main(["embed", "--ray", "--input", str(d / "pages"), "-o", str(out), "--model", ckpt]) == 1
    assert "holds an earlier run's parquet files" in capsys.readouterr().err
    assert main(["embed", "a text", "--ray", "-o", str(out), "--model", ckpt]) == 1
    assert "with --ray, give --input files" in capsys.readouterr().err
    for options, message in [
        (["--task", "nope"], "unknown task 'nope'"),  # checked before any actor starts
        (["--multivector", "--truncate-dim", "16"], "truncate_dim applies to single vectors"),
        (["--truncate-dim", "17"], "truncate_dim=17 is not one of the Matryoshka dims"),
    ]:
        assert (
            main(
                ["embed", "--ray", "--input", str(d / "pages"), "-o", str(tmp_path / "new"), "--model", ckpt, *options]
            )
            == 1
        )
        assert message in capsys.readouterr().err


def test_a_task_of_the_checkpoint(models, batch_tol, corpus, tmp_path, checkpoints):
    """A task saved with its prompt rule (tests/test_tasks.py) is taken by name, as the released ones are."""
    from jina_v4 import JinaV4
    from jina_v4.apps.saving import save_checkpoint

    model = JinaV4.from_pretrained(checkpoints["gqa4-single"], device="cpu", dtype="float32")
    model.add_task("legal", init_from="retrieval", query="Clause question: ", passage="Clause: ")
    path = save_checkpoint(model, checkpoints["gqa4-single"], tmp_path / "legal", ["legal"])
    d, inputs = corpus
    embed_corpus(
        [str(d / "corpus.jsonl")],
        str(tmp_path / "out"),
        str(path),
        actors=1,
        rows=5,
        task="legal",
        prompt_name="passage",
    )
    ids, vectors = read_vectors(tmp_path / "out")
    expected = model.encode(inputs, task="legal", prompt_name="passage")
    assert_equal_vectors(in_id_order(ids, vectors)[1], expected, False, batch_tol("gqa4-single"))
