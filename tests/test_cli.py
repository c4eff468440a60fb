"""The installed `jina-v4` console script, run as a subprocess on a tiny checkpoint; every output read back
and compared with the Python API."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from jina_v4.model.loading import EMULATED

SCRIPT = shutil.which("jina-v4") or str(Path(sys.executable).parent / "jina-v4")
TEXTS = ["first text", "zweiter Text", "第三个文本"]


def run(*args, stdin=None, ok=True, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    out = subprocess.run([SCRIPT, *map(str, args)], capture_output=True, text=True, input=stdin, env=env, timeout=300)
    if ok:
        assert out.returncode == 0, out.stderr
    return out


@pytest.fixture(scope="module")
def ckpt(checkpoints):
    return checkpoints["gqa4-single"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for name, (h, w) in [("a.png", (120, 90)), ("b.jpg", (60, 200)), ("sub/c.png", (300, 300))]:
        (d / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / name)
    (d / "notes.txt").write_text("not an image")
    return d


def test_embed_texts_jsonl_stdout(ckpt, models, batch_tol):
    out = run("embed", *TEXTS, "--model", ckpt, "--task", "code", "--prompt-name", "passage")
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    expected = models("gqa4-single").encode_text(TEXTS, task="code", prompt_name="passage")
    assert [r["input"] for r in rows] == TEXTS
    assert torch.allclose(torch.tensor([r["embedding"] for r in rows]), expected, atol=batch_tol("gqa4-single"))
    lines = out.stderr.strip().splitlines()
    assert lines[0] == "jina-v4: float32 on cpu (the checkpoint's dtype)"
    assert lines[-1].startswith("embedded 3 items (") and lines[-1].endswith(" s")


def test_embed_from_files_and_stdin(ckpt, models, batch_tol, tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(TEXTS[:2]) + "\n\n")
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(TEXTS)))
    out = run(
        "embed",
        "--input",
        tmp_path / "t.txt",
        "--input",
        tmp_path / "t.jsonl",
        "--text-field",
        "body",
        "--model",
        ckpt,
        "--truncate-dim",
        16,
        "-o",
        tmp_path / "o.npy",
        "--quiet",
    )
    got = np.load(tmp_path / "o.npy")
    expected = models("gqa4-single").encode_text(TEXTS[:2] + TEXTS, task="retrieval", truncate_dim=16)
    assert got.shape == (5, 16) and np.allclose(got, expected.numpy(), atol=batch_tol("gqa4-single"))
    assert out.stderr == ""  # --quiet: no progress bar, no summary
    piped = run("embed", "--model", ckpt, "--quiet", stdin="\n".join(TEXTS) + "\n")
    assert [json.loads(line)["input"] for line in piped.stdout.splitlines()] == TEXTS


def test_embed_images_and_texts_multivector_safetensors(ckpt, models, batch_tol, images, tmp_path):
    out_file = tmp_path / "o.safetensors"
    run(
        "embed",
        TEXTS[0],
        "--image",
        images / "a.png",
        "--image",
        str(images / "*.jpg"),
        "--image",
        images / "sub",
        "--multivector",
        "--model",
        ckpt,
        "-o",
        out_file,
        "--max-pixels",
        50_000,
    )
    with safe_open(out_file, "pt") as f:
        padded, mask, meta = f.get_tensor("embeddings"), f.get_tensor("mask"), f.metadata()
    inputs = json.loads(meta["inputs"])
    assert inputs == [TEXTS[0], str(images / "a.png"), str(images / "b.jpg"), str(images / "sub" / "c.png")]
    model = models("gqa4-single")
    expected = [model.encode_text(TEXTS[0], task="retrieval", return_multivector=True)]
    expected += model.encode_image(inputs[1:], task="retrieval", return_multivector=True, max_pixels=50_000)
    for row, m, e in zip(padded, mask, expected):
        assert m.sum() == len(e) and torch.allclose(row[m], e, atol=batch_tol("gqa4-single")) and not row[~m].any()


def test_embed_jsonl_file(ckpt, models, batch_tol, images, tmp_path):
    run("embed", "--image", images / "a.png", "--model", ckpt, "-o", tmp_path / "o.jsonl", "--task", "text-matching")
    row = json.loads((tmp_path / "o.jsonl").read_text())
    expected = models("gqa4-single").encode_image(str(images / "a.png"), task="text-matching")
    assert row["input"] == str(images / "a.png") and torch.allclose(
        torch.tensor(row["embedding"]), expected, atol=batch_tol("gqa4-single")
    )


def test_score(ckpt, models, images):
    out = run(
        "score",
        "query one",
        "query two",
        "--doc",
        "doc a",
        "--doc",
        "doc b",
        "--image",
        images / "a.png",
        "--model",
        ckpt,
    )
    model = models("gqa4-single")
    q = model.encode_text(["query one", "query two"], task="retrieval")
    d = model.encode(
        [{"text": "doc a"}, {"text": "doc b"}, {"image": str(images / "a.png")}],
        task="retrieval",
        prompt_name="passage",
    )
    lines = out.stdout.splitlines()
    assert lines[0] == "query: query one" and "cosine" in lines[1]
    ranked = [float(line.split()[1]) for line in lines[2:5]]
    assert ranked == sorted(ranked, reverse=True)
    assert np.allclose(
        sorted(ranked, reverse=True), sorted((q @ d.T)[0].tolist(), reverse=True), atol=1e-4
    )  # the table prints 4 decimals (±5e-5), plus rounding
    multi = run(
        "score", "query one", "--doc", "doc a", "--doc", "doc b", "--multivector", "--top", 1, "--model", ckpt
    ).stdout.splitlines()
    assert "MaxSim" in multi[1] and len(multi) == 3


def test_heatmap_png(ckpt, images, tmp_path):
    """The 200x60 picture with the heat over it, and under it a colour scale (40 px): the ramp from dark blue
    (the lowest cell score) to yellow (the highest), and the values written under its ends and middle."""
    from jina_v4.apps.cli import colormap

    out = run("heatmap", "a query", images / "b.jpg", "-o", tmp_path / "h.png", "--model", ckpt)
    with Image.open(tmp_path / "h.png") as png:
        assert png.format == "PNG" and png.size == (240, 100)  # the scale needs 240 px: the canvas widens
        pixels = np.asarray(png.convert("RGB"))
    bar = pixels[66:78, 8:232]  # 12 rows of the ramp
    assert (bar == bar[:1]).all()  # each column one colour
    assert (bar[0, 0] == colormap(np.array(0.0))).all() and (bar[0, -1] == colormap(np.array(1.0))).all()
    assert np.abs(bar[0].astype(int) - colormap(np.linspace(0, 1, 224)).astype(int)).max() == 0
    labels = pixels[83:100]
    for columns in (slice(0, 60), slice(90, 150), slice(180, 240)):  # text under the left end, middle, right end
        assert (labels[:, columns].max(axis=-1) < 100).any()
    assert (pixels[60:, 200:][:5] == 255).all()  # white beside the picture, above the bar
    assert "wrote" in out.stderr and "scores " in out.stderr


def test_info_and_module_entry(ckpt):
    out = run("info", "--model", ckpt)
    assert "base model (no adapters)" in out.stdout and "adapter code" in out.stdout
    via_module = subprocess.run(
        [sys.executable, "-m", "jina_v4", "info", "--model", str(ckpt)], capture_output=True, text=True
    )
    assert via_module.returncode == 0 and via_module.stdout == out.stdout


@pytest.mark.parametrize(
    "native, dtype, line",
    [
        (None, [], "float32 on cpu (" + EMULATED + ")"),
        ("AMX", [], "bfloat16 on cpu (the checkpoint's dtype; this CPU multiplies bf16 natively: AMX)"),
        (None, ["--dtype", "bfloat16"], "bfloat16 on cpu (as asked; " + EMULATED + ")"),
        ("AVX512-BF16", ["--dtype", "float32"], "float32 on cpu (as asked)"),
    ],
)
def test_the_dtype_and_why_once(checkpoints, native, dtype, line):
    """A bf16 checkpoint on CPUs with and without native bf16 (the detector patched in the process): one line on
    stderr says the dtype and why, and replaces the emulation warning; --quiet silences it; `info` shows it."""
    code = (
        f"import sys, jina_v4.model.loading as m; m.native_bf16 = lambda: {native!r}; "
        "from jina_v4.apps.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    bf16 = checkpoints["mha-bf16"]
    for quiet in ([], ["--quiet"]):
        out = subprocess.run(
            [sys.executable, "-c", code, "embed", "a text", "--model", bf16, "--device", "cpu", *dtype, *quiet],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=300,
        )
        assert out.returncode == 0 and len(json.loads(out.stdout)["embedding"]) == 96, out.stderr
        lines = out.stderr.splitlines()
        assert out.stderr == "" if quiet else lines[:-1] == [f"jina-v4: {line}"] and "embedded 1" in lines[-1], lines
    info = subprocess.run(
        [sys.executable, "-c", code, "info", "--model", bf16, "--device", "cpu", *dtype],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert info.returncode == 0 and info.stderr == "" and f"dtype: {line}; the weights take bfloat16 " in info.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["embed", "--input", "/no/such.txt"], "/no/such.txt: no such file"),
        (["embed", "--image", "IMAGES/notes.txt"], "input 0 ("),
        (["embed", "--image", "IMAGES/*.gif"], "matches no image file"),
        (["embed", "x", "--image", "IMAGES/notes.txt"], "cannot identify image file"),
        (["embed", "x", "--truncate-dim", "7"], "truncate_dim=7 is not one of the Matryoshka dims"),
        (["embed", "x", "--task", "search"], "unknown task 'search'"),
        (["embed", "x", "-o", "out.csv"], "out.csv: the output must end in .npy, .safetensors or .jsonl"),
        (["embed", "x", "--max-length", "0"], "--max-length must be positive, got 0"),
        (["embed", "x", "--device", "cuda"], "no CUDA device"),
        (["score", "q"], "no documents"),
        (["heatmap", "q", "/no/such.png"], "No such file"),
    ],
)
def test_errors_are_one_line(ckpt, images, tmp_path, args, message):
    args = [a.replace("IMAGES", str(images)) for a in args]
    out = run(*args, "--model", ckpt, ok=False)
    assert out.returncode == 1
    *before, last = out.stderr.splitlines()  # the error is one line, after the dtype line once a model loaded
    assert last.startswith("jina-v4: error: ") and message in last, out.stderr
    assert before in ([], ["jina-v4: float32 on cpu (the checkpoint's dtype)"]), out.stderr


def test_bad_option_and_missing_model():
    assert run("embed", "--no-such-option", ok=False).returncode == 2
    out = run("embed", "x", "--model", "/no/such/dir", ok=False)
    assert out.returncode == 1 and "not a checkpoint directory" in out.stderr


def test_offline_hub_error_is_whole_and_says_what_to_do(tmp_path):
    """No checkpoint at hand and the hub off (HF_HUB_OFFLINE=1: nothing leaves the machine): the hub's whole
    message, then the ways out: a local checkpoint, the hub cache and where it is, HF_HUB_OFFLINE."""
    out = run("embed", "a text", ok=False, env={"HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 1
    err = out.stderr
    assert err.startswith("jina-v4: error: jinaai/jina-embeddings-v4: cannot fetch from the hub (LocalEntryNotFound")
    assert "environment variable.)\n" in err  # the end of huggingface-hub's own message: nothing cut
    assert "--model DIR" in err and "scripts/synthetic.py DIR" in err
    assert f"the hub cache, {tmp_path / 'hf' / 'hub'}" in err and "HF_HUB_OFFLINE=1" in err
    assert "Traceback" not in err


def test_output_into_a_closed_pipe_ends_quietly(ckpt):
    """`jina-v4 ... | head`: when the reader has gone, the command stops with status 0 and says nothing. The read
    end is closed before the command starts, so every run meets the closed pipe (no race with a reader)."""
    for args in (["info", "--layers"], ["embed", *TEXTS, "--quiet"]):  # --quiet: no dtype line on stderr
        read, write = os.pipe()
        os.close(read)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        out = subprocess.run(
            [SCRIPT, *args, "--model", str(ckpt)], stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=300
        )
        os.close(write)
        assert (out.returncode, out.stderr) == (0, ""), args
    shell = f"set -o pipefail; {SCRIPT} info --layers --model {ckpt} | head -3"
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=300)
    assert (out.returncode, out.stderr, len(out.stdout.splitlines())) == (0, "", 3)


def test_image_takes_several_paths(ckpt, images, tmp_path):
    """`--image pages/*.png` unquoted: the shell hands over several paths after one --image."""
    shell = run("embed", "--image", images / "a.png", images / "b.jpg", "--model", ckpt, "-o", tmp_path / "a.jsonl")
    quoted = run("embed", "--image", str(images / "*.*g"), "--model", ckpt, "-o", tmp_path / "b.jsonl")
    assert "embedded 2 items" in shell.stderr and "embedded 2 items" in quoted.stderr
    rows = [[json.loads(line) for line in (tmp_path / f).read_text().splitlines()] for f in ("a.jsonl", "b.jsonl")]
    assert (
        [r["input"] for r in rows[0]] == [r["input"] for r in rows[1]] == [str(images / "a.png"), str(images / "b.jpg")]
    )
    assert [r["embedding"] for r in rows[0]] == [r["embedding"] for r in rows[1]]
    ranked = run("score", "a query", "--image", images / "a.png", images / "b.jpg", "--model", ckpt).stdout
    assert "image: " + str(images / "a.png") in ranked and "image: " + str(images / "b.jpg") in ranked


def test_serve_help_names_its_extra():
    out = run("serve", "--help")
    assert "pip install 'jina_v4[serve]'" in " ".join(out.stdout.split())
