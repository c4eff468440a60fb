"""Tasks are data: a task added with its own prompt rule and saved with a checkpoint works everywhere without
editing code: encode_*, `jina-v4 embed` / `score` (and their help), the server ("legal.query"), and, in
test_ray.py, Ray."""

import json

import numpy as np
import pytest
import torch

from test_cli import run
from test_serve import Server, embed


@pytest.fixture(scope="module")
def legal(checkpoints, tmp_path_factory):
    """gqa4-single with a task "legal" (retrieval's adapter, prefixes "Clause question: " / "Clause: "), saved."""
    from jina_v4 import JinaV4
    from jina_v4.apps.saving import save_checkpoint

    model = JinaV4.from_pretrained(checkpoints["gqa4-single"], device="cpu", dtype="float32")
    model.add_task("legal", init_from="retrieval", query="Clause question: ", passage="Clause: ")
    out = save_checkpoint(model, checkpoints["gqa4-single"], tmp_path_factory.mktemp("legal") / "ckpt", ["legal"])
    return out, JinaV4.from_pretrained(out, device="cpu", dtype="float32")


def test_the_rule_is_saved_and_read_back(legal):
    path, model = legal
    assert json.loads((path / "config.json").read_text())["task_prompts"]["legal"] == {
        "query": "Clause question: ",
        "passage": "Clause: ",
    }
    assert model.tasks["legal"].query == "Clause question: " and not model.tasks["legal"].symmetric
    ids = model.prepare(["notice period"], "legal", "passage")[0].input_ids
    assert ids == model.processor.tokenize(["Clause: notice period"])[0].input_ids


def test_the_command_line_takes_it(legal, batch_tol, tmp_path):
    path, model = legal
    run(
        "embed",
        "notice period",
        "--model",
        path,
        "--task",
        "legal",
        "--prompt-name",
        "passage",
        "-o",
        tmp_path / "v.npy",
        "--quiet",
    )
    expected = model.encode_text(["notice period"], task="legal", prompt_name="passage")
    assert np.abs(np.load(tmp_path / "v.npy") - expected.numpy()).max() <= batch_tol("gqa4-single")
    out = run("score", "notice period", "--doc", "a clause on notice", "--model", path, "--task", "legal")
    assert "a clause on notice" in out.stdout
    help_text = " ".join(run("embed", "--help", "--model", path).stdout.split())  # argparse wraps its lines
    assert "a task of the checkpoint: retrieval, text-matching, code, legal" in help_text


def test_the_server_takes_it(legal, batch_tol):
    from jina_v4.apps.serve import create_app

    path, model = legal
    server = Server(create_app(model, str(path)))
    try:
        out = embed(server, {"task": "legal.query", "input": ["notice period", "termination"]})
    finally:
        server.stop()
    got = torch.tensor([d["embedding"] for d in out["data"]])
    expected = model.encode_text(["notice period", "termination"], task="legal", prompt_name="query")
    assert (got - expected).abs().max() <= batch_tol("gqa4-single")
