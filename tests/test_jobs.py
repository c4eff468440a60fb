"""Long `jina-v4 embed` jobs: sharded output, interrupted by a real kill and resumed, bad items skipped and
reported, a directory never mixing two runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jina_v4.apps.jobs import read_shards

from test_cli import run

N = 200  # inputs; shards of 5
PAUSER = Path(__file__).parent / "pausing_embed.py"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    lines = [json.dumps({"text": f"document {i}: " + "words and more words " * (1 + i % 7)}) for i in range(N)]
    (d / "corpus.jsonl").write_text("\n".join(lines))
    return d / "corpus.jsonl"


def embed_args(ckpt, corpus, out, *extra, quiet=True):
    return ["embed", "--input", corpus, "--model", ckpt, "-o", out, "--shard-size", 5, *extra] + ["--quiet"] * quiet


def test_sharded_equals_single_file(checkpoints, corpus, batch_tol, tmp_path):
    ckpt = checkpoints["gqa4-single"]
    run(*embed_args(ckpt, corpus, tmp_path / "one.safetensors"))
    from safetensors.torch import load_file

    single = load_file(tmp_path / "one.safetensors")
    for fmt in ("safetensors", "jsonl", "npy"):
        out = tmp_path / f"shards-{fmt}"
        run(*embed_args(ckpt, corpus, out, "--format", fmt))
        index, vectors = read_shards(out)
        assert index == list(range(N)) and len(list(out.glob(f"shard-?????.{fmt}"))) == N // 5
        assert torch.allclose(torch.stack(vectors), single["embeddings"], atol=batch_tol("gqa4-single"))


def paused_run(args, after: int, tmp_path):
    """`jina-v4 embed ARGS` paused for good after writing its `after`-th shard (tests/pausing_embed.py): the
    process, once it is provably mid-run. Nothing here depends on how fast the machine is."""
    marker = tmp_path / f"paused-{after}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(PAUSER), str(after), str(marker), *map(str, args)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300  # a bound on a hang, not a timing assumption: the marker ends the wait
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not marker.exists():
        proc.kill()
        raise AssertionError(f"the run did not pause after shard {after}: {proc.communicate()[1][-2000:]}")
    return proc


def test_killed_run_resumes_without_loss_or_duplicates(checkpoints, corpus, tmp_path):
    ckpt = checkpoints["gqa4-single"]
    full, partial = tmp_path / "full", tmp_path / "partial"
    run(*embed_args(ckpt, corpus, full, "--batch-size", 2))
    proc = paused_run(embed_args(ckpt, corpus, partial, "--batch-size", 2), 2, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(list(partial.glob("shard-*.safetensors"))) == 2  # killed after its second shard, before a third
    out = run(*embed_args(ckpt, corpus, partial, "--batch-size", 2, quiet=False))  # the same run, with a summary
    assert f"embedded {N - 10} items" in out.stderr and "an earlier run had embedded 10 and skipped 0" in out.stderr
    a, b = read_shards(full), read_shards(partial)
    assert a[0] == b[0] == list(range(N))
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))  # item for item, bit for bit
    assert not list(partial.glob("*.tmp"))


def test_interrupt_with_ctrl_c(checkpoints, corpus, tmp_path):
    ckpt, out = checkpoints["gqa4-single"], tmp_path / "ctrl-c"
    proc = paused_run(embed_args(ckpt, corpus, out, "--batch-size", 1), 1, tmp_path)
    proc.send_signal(signal.SIGINT)
    try:
        status = proc.wait(timeout=120)  # a run that ignores SIGINT never ends: a failure, not a hang
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("SIGINT did not stop the run") from None
    assert status == 130 and "interrupted" in proc.stderr.read()
    assert len(list(out.glob("shard-*.safetensors"))) == 1 and not list(out.glob("*.tmp"))
    run(*embed_args(ckpt, corpus, out))
    assert read_shards(out)[0] == list(range(N))


def test_skip_and_report(checkpoints, corpus, tmp_path):
    ckpt = checkpoints["gqa4-single"]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    good = tmp_path / "fine.png"
    from PIL import Image

    Image.new("RGB", (64, 48), (10, 200, 30)).save(good)
    inputs = ["embed", "a text", "--image", bad, "--image", good, "--model", ckpt]
    failed = run(*inputs, "-o", tmp_path / "x.npy", ok=False)
    assert failed.returncode == 1 and f"input 1 ({bad})" in failed.stderr and "UnidentifiedImageError" in failed.stderr
    out = run(*inputs, "-o", tmp_path / "x.jsonl", "--on-error", "skip")
    rows = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 2] and "1 skipped" in out.stderr
    report = [json.loads(line) for line in (tmp_path / "x.jsonl.skipped.jsonl").read_text().splitlines()]
    assert report == [{"index": 1, "id": 1, "input": str(bad), "error": report[0]["error"]}]
    assert report[0]["error"].startswith("UnidentifiedImageError: cannot identify image file")
    shards = tmp_path / "skip-shards"
    run(*inputs, "-o", shards, "--on-error", "skip", "--shard-size", 2)
    assert read_shards(shards)[0] == [0, 2]
    assert [json.loads(line)["index"] for line in (shards / "skipped.jsonl").read_text().splitlines()] == [1]


def test_directory_of_another_run(checkpoints, corpus, tmp_path):
    ckpt, out = checkpoints["gqa4-single"], tmp_path / "taken"
    run(*embed_args(ckpt, corpus, out))
    other = run(*embed_args(ckpt, corpus, out, "--task", "code"), ok=False)
    assert other.returncode == 1 and "holds a run with other inputs or settings" in other.stderr
