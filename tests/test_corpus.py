"""One corpus format for `jina-v4 embed --input` (and `embed --ray`, tests/test_ray.py): corpus.py's reader on jsonl
(text or image rows, optional ids, image paths relative to the file), parquet, image directories and text files;
bad lines skipped and named; and honest counts and reports (global index and id) in single-file, sharded and
resumed runs."""

import json
import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jina_v4.apps import corpus
from jina_v4.apps.corpus import CorpusError
from jina_v4.apps.jobs import read_shards

from test_cli import run
from test_jobs import paused_run

TEXTS = [f"document {i}: " + "words " * (1 + i % 3) for i in range(6)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """pages/a.png, pages/b.jpg and corpus.jsonl: texts and images (paths relative to the file), with ids."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    (d / "pages").mkdir()
    for name, (h, w) in [("a.png", (80, 60)), ("b.jpg", (40, 120))]:
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / "pages" / name)
    rows = [{"id": "t0", "text": TEXTS[0]}, {"id": "p1", "image": "pages/a.png"}, {"id": "t2", "text": TEXTS[1]}]
    rows += [{"id": "p3", "image": "pages/b.jpg"}, {"id": "t4", "text": TEXTS[2]}]
    (d / "corpus.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def inputs_of(folder):
    return [
        {"text": TEXTS[0]},
        {"image": str(folder / "pages" / "a.png")},
        {"text": TEXTS[1]},
        {"image": str(folder / "pages" / "b.jpg")},
        {"text": TEXTS[2]},
    ]


# ---- the reader ------------------------------------------------------------------------------------------------


def test_indices_ids_and_relative_paths(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # image paths are relative to the file, not to where the command runs
    (tmp_path / "lines.txt").write_text("line one\n\nline two\n")
    rows = corpus.read(["given"], [str(folder / "corpus.jsonl"), "lines.txt"], [str(folder / "pages" / "b.jpg")])
    assert [r.index for r in rows] == list(range(9))
    assert [r.id for r in rows] == [0, "t0", "p1", "t2", "p3", "t4", 6, 7, 8]
    assert [r.input for r in rows[1:6]] == inputs_of(folder)
    assert [r.label for r in rows[6:8]] == ["line one", "line two"]
    assert rows[8].input == {"image": str(folder / "pages" / "b.jpg")}
    found = corpus.read([], [str(folder / "pages")])  # a directory: its images, the paths as ids
    assert [(r.index, r.id) for r in found] == [
        (0, str(folder / "pages" / "a.png")),
        (1, str(folder / "pages" / "b.jpg")),
    ]


BAD_LINES = [
    ('{"id": "a", "text": "fine"}', None),
    ("{not json", "not valid JSON"),
    ('["a list"]', "not a JSON object"),
    ('{"id": "c", "text": "x", "image": "p.png"}', "not both"),
    ('{"id": "d"}', "this one has neither"),
    ('{"id": "e", "text": 7}', "text is int, not str: 7"),
    ('{"id": "f", "text": "bad \\ud800 text"}', "lone surrogate"),
    ('{"id": "a", "text": "again"}', "id 'a' repeats"),
    ('{"text": "no id"}', "in some lines and not in others"),
    ('{"id": [1], "text": "x"}', "not an int or a str"),
    ('{"id": "k", "image": 5}', "image is int, not a path"),
    ('{"id": "l", "text": "last, fine"}', None),
]


def test_bad_lines_skipped_and_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(line for line, _ in BAD_LINES) + "\n")
    rows = corpus.read([], [str(path)], on_error="skip")
    assert [r.index for r in rows] == list(range(len(BAD_LINES)))  # a bad line keeps its index
    for n, (r, (_, why)) in enumerate(zip(rows, BAD_LINES), 1):
        if why is None:
            assert r.error is None and r.input["text"] in ("fine", "last, fine")
        else:
            assert r.input is None and r.error.startswith(f"{path}:{n}: ") and why in r.error, (n, r.error)
    assert [r.id for r in rows] == ["a", None, None, "c", "d", "e", "f", "a", None, None, "k", "l"]
    record = rows[5].record()
    assert (record["index"], record["id"], record["input"]) == (5, "e", '{"id": "e", "text": 7}')
    assert record["error"] == f"{path}:6: text is int, not str: 7"
    with pytest.raises(CorpusError, match=rf"^{path}:2: not valid JSON"):
        corpus.read([], [str(path)])


def test_parquet_and_missing_files(folder, tmp_path):
    images = [(folder / "pages" / "a.png").read_bytes(), None, None]
    table = pa.table({"text": [None, TEXTS[0], None], "image": pa.array(images, pa.binary())})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)
    pq.write_table(pa.table({"text": [TEXTS[1]], "image": pa.array([None], pa.binary())}), tmp_path / "b.parquet")
    rows = corpus.read(["first"], [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")], on_error="skip")
    assert [(r.index, r.id) for r in rows] == [(i, i) for i in range(5)]
    assert rows[1].input == {"image": images[0]} and rows[1].label == f"<{len(images[0])} bytes>"
    assert rows[2].input == {"text": TEXTS[0]} and rows[4].input == {"text": TEXTS[1]}
    assert (
        rows[3].input is None and f"{tmp_path / 'a.parquet'}: row 2: " in rows[3].error and "neither" in rows[3].error
    )
    paths = pa.table({"id": ["x", "y"], "image": ["pages/a.png", str(folder / "pages" / "b.jpg")]})
    pq.write_table(paths, folder / "paths.parquet")
    assert [(r.id, r.input) for r in corpus.read([], [str(folder / "paths.parquet")])] == [
        ("x", {"image": str(folder / "pages" / "a.png")}),  # relative to the parquet file
        ("y", {"image": str(folder / "pages" / "b.jpg")}),
    ]
    with pytest.raises(CorpusError, match="no.such: no such file or directory"):
        corpus.read([], [str(tmp_path / "no.such")])


# ---- the command -----------------------------------------------------------------------------------------------


def test_embed_input_reads_image_rows(checkpoints, models, batch_tol, folder, tmp_path):
    """The jsonl of the Ray section (image rows, ids) through plain `embed --input`: ids kept, vectors equal."""
    out = tmp_path / "o.jsonl"
    run("embed", "--input", folder / "corpus.jsonl", "--model", checkpoints["gqa4-single"], "-o", out, "--quiet")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["id"]) for r in rows] == [(0, "t0"), (1, "p1"), (2, "t2"), (3, "p3"), (4, "t4")]
    expected = models("gqa4-single").encode(inputs_of(folder), task="retrieval")
    assert torch.allclose(torch.tensor([r["embedding"] for r in rows]), expected, atol=batch_tol("gqa4-single"))


def test_embed_skips_bad_lines_and_counts_them(checkpoints, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(line for line, _ in BAD_LINES) + "\n")
    failed = run("embed", "--input", path, "--model", "/no/model/needed/yet", ok=False)
    assert failed.returncode == 1 and f"{path}:2: not valid JSON" in failed.stderr  # before the model loads
    out = run(
        "embed", "--input", path, "--model", checkpoints["gqa4-single"], "-o", tmp_path / "o.npy", "--on-error", "skip"
    )
    bad = len([1 for _, why in BAD_LINES if why])
    assert (
        "embedded 2 items" in out.stderr
        and f"; {bad} skipped (listed in {tmp_path / 'o.npy.skipped.jsonl'})" in out.stderr
    )
    report = [json.loads(line) for line in (tmp_path / "o.npy.skipped.jsonl").read_text().splitlines()]
    assert [r["index"] for r in report] == [i for i, (_, why) in enumerate(BAD_LINES) if why]
    assert all(r["error"].startswith(f"{path}:{r['index'] + 1}: ") for r in report)
    assert np.load(tmp_path / "o.npy").shape == (2, 64)


def test_sharded_counts_and_global_reports(checkpoints, tmp_path):
    """25 inputs written and 1 skipped, in shards of 20: the summary counts 25 and 1, the report names the bad input
    by its index in the run (25, not its place in the shard) and its id; a resumed run counts what was done before."""
    rows = [{"id": f"doc-{i}", "text": f"text number {i}"} for i in range(26)]
    rows[25] = {"id": "doc-25", "image": "missing.png"}
    rows[3] = {"id": "doc-3", "image": "missing-too.png"}
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    args = ["embed", "--input", tmp_path / "c.jsonl", "--model", checkpoints["gqa4-single"], "--on-error", "skip"]
    out = run(*args, "-o", tmp_path / "shards", "--shard-size", 20)
    assert (
        "embedded 24 items (" in out.stderr
        and f"; 2 skipped (listed in {tmp_path / 'shards' / 'skipped.jsonl'})" in out.stderr
    )
    report = [json.loads(line) for line in (tmp_path / "shards" / "skipped.jsonl").read_text().splitlines()]
    assert [(r["index"], r["id"]) for r in report] == [(3, "doc-3"), (25, "doc-25")]
    assert report[1]["input"] == str(tmp_path / "missing.png") and "FileNotFoundError" in report[1]["error"]
    assert not any("inputs[" in r["error"] for r in report)
    index, _ = read_shards(tmp_path / "shards")
    assert index == [i for i in range(26) if i not in (3, 25)]
    failed = run(*args[:-2], "-o", tmp_path / "fail", "--shard-size", 20, ok=False)
    assert "input 3, id 'doc-3' (" in failed.stderr and "FileNotFoundError" in failed.stderr

    proc = paused_run([*args, "-o", tmp_path / "resumed", "--shard-size", 10, "--quiet"], 1, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = run(*args, "-o", tmp_path / "resumed", "--shard-size", 10)
    assert "embedded 15 items (" in again.stderr and "; 1 skipped" in again.stderr
    assert "an earlier run had embedded 9 and skipped 1" in again.stderr
    report = [json.loads(line) for line in (tmp_path / "resumed" / "skipped.jsonl").read_text().splitlines()]
    assert [(r["index"], r["id"]) for r in report] == [(3, "doc-3"), (25, "doc-25")]


def test_single_file_names_index_and_id_on_stderr(checkpoints, tmp_path):
    rows = [{"id": "ok", "text": "fine"}, {"id": "gone", "image": "nowhere.png"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = run("embed", "--input", tmp_path / "c.jsonl", "--model", checkpoints["gqa4-single"], "--on-error", "skip")
    assert [json.loads(line)["id"] for line in out.stdout.splitlines()] == ["ok"]
    assert f"skipped input 1, id 'gone' ({tmp_path / 'nowhere.png'}): FileNotFoundError" in out.stderr
    assert "embedded 1 items" in out.stderr and "1 skipped (listed above)" in out.stderr


def test_lone_surrogate_argument_is_reported(checkpoints, tmp_path):
    """A command-line text that is not UTF-8 (Python hands it over with a lone surrogate) is a bad input like any
    other: skipped and reported, and the report is valid JSON."""
    text = b"bad \xff text".decode("utf-8", "surrogateescape")
    out = run("embed", "good", text, "--model", checkpoints["gqa4-single"], "-o", tmp_path / "s", "--on-error", "skip")
    assert "embedded 1 items" in out.stderr and "1 skipped" in out.stderr
    report = json.loads((tmp_path / "s" / "skipped.jsonl").read_text())
    assert report["index"] == 1 and report["input"] == text and "lone surrogate" in report["error"]
