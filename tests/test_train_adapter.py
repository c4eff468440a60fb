"""scripts/train_adapter.py end to end: the saved --out is a checkpoint the reference (peft) loads, with new-task
embeddings equal to ours; bad data stops before training with the line named; an interrupted run resumes to the
same result as an uninterrupted one; 2 processes (torchrun, gloo on 127.0.0.1) equal 1 process with the doubled
batch; and on a synthetic task where the base model is at chance it learns to top-1 >= 0.9 in under a minute."""

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from jina_v4 import JinaV4
from jina_v4.apps.training import backward, trainable

import train_adapter
from distributed_check import TASK, distributed_groups, image, loss_of
from tolerances import FP32, float64_copy, fp32_error, max_diff

WORKER = Path(__file__).parent / "distributed_check.py"
TEXTS = ["a query about the sea", "Ein Satz auf Deutsch über Küstenstädte.", "x"]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_pairs(directory: Path, text_rows: int = 8, image_rows: int = 4) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "query": f"query {i} " + "word " * i,
            "positive": f"passage {i} " + "text " * (2 * i),
            "negatives": [f"negative {i}"] * (i % 3),
        }
        for i in range(text_rows)
    ]
    for i in range(image_rows):
        image(56 + 10 * i, 80, i).save(directory / f"page{i}.png")
        rows.append(
            {
                "query": f"which page {i}",
                "positive": f"page{i}.png",
                "negatives": [{"image": f"page{(i + 1) % image_rows}.png"}] if i % 2 else [],
            }
        )
    path = directory / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(*args) -> float:
    return train_adapter.main([str(a) for a in args] + ["--quiet"])


def state(out: Path) -> dict:
    return torch.load(out / "training" / "state.pt", weights_only=False)


@pytest.fixture(scope="module")
def trained(checkpoints, tmp_path_factory):
    """mha-bf16 (bf16 files) + a new task 'legal' copied from retrieval, 3 steps on texts and images."""
    root = tmp_path_factory.mktemp("trained")
    data = write_pairs(root / "data")
    run(
        "--model",
        checkpoints["mha-bf16"],
        "--data",
        data,
        "--task",
        "legal",
        "--init-from",
        "retrieval",
        "--steps",
        3,
        "--batch-size",
        4,
        "--lr",
        1e-2,
        "--out",
        root / "out",
        "--matryoshka-dims",
        8,
        16,
    )
    return checkpoints["mha-bf16"], root / "out"


def test_saved_checkpoint_is_the_released_layout(trained):
    source, out = trained
    config, before = (json.loads((d / "config.json").read_text()) for d in (out, source))
    assert config.pop("task_names") == before.pop("task_names") + ["legal"]
    rules = {t: {"query": "Query: ", "passage": "Passage: "} for t in ("retrieval", "code", "legal")}
    assert config.pop("task_prompts") == {**rules, "text-matching": {"query": "Query: ", "passage": "Query: "}}
    assert config == before  # the prompt rules saved with the tasks, nothing else changed
    assert (out / "adapters/adapter_config.json").read_bytes() == (source / "adapters/adapter_config.json").read_bytes()
    for f in source.iterdir():
        if f.is_file() and f.name != "config.json":
            assert os.path.samefile(f, out / f.name)  # linked, never rewritten
    with (
        safe_open(out / "adapters/adapter_model.safetensors", "pt") as new,
        safe_open(source / "adapters/adapter_model.safetensors", "pt") as old,
    ):
        assert set(new.keys()) - set(old.keys()) == {
            k.replace(".retrieval.", ".legal.") for k in old.keys() if ".retrieval." in k
        }
        for k in old.keys():
            assert torch.equal(new.get_tensor(k), old.get_tensor(k))  # old tasks: the same tensors
        moved = [
            not torch.equal(new.get_tensor(k.replace(".retrieval.", ".legal.")).to(torch.bfloat16), old.get_tensor(k))
            for k in old.keys()
            if ".retrieval." in k
        ]
        assert all(moved)  # every tensor of the new task trained


def test_reference_loads_the_new_task(trained):
    from reference import Reference
    from test_images import picture, reference_image

    _, out = trained
    ref, model = Reference(out), JinaV4.from_pretrained(out, device="cpu", dtype="float32")
    saved = state(out)["params"]
    assert all(torch.equal(p, saved[n]) for n, p in model.named_parameters() if n.endswith(".legal"))
    img = picture(120, 90, 3, noise=12)

    def run(m):
        out = []
        for pn in ("query", "passage"):
            out += [m.encode_text(TEXTS, task="legal", prompt_name=pn)]
            out += m.encode_text(TEXTS, task="legal", prompt_name=pn, return_multivector=True)
        return out + [
            m.encode_image(img, task="legal"),
            m.encode_image([img], task="legal", return_multivector=True)[0],
        ]

    expected = []
    for pn in ("query", "passage"):
        expected += [ref.encode_text(TEXTS, "legal", pn)] + ref.encode_text(TEXTS, "legal", pn, multivector=True)
    expected += [
        reference_image(ref, model, img, "legal")[0],
        reference_image(ref, model, img, "legal", multivector=True)[0],
    ]
    diffs = [max_diff(a, b) for a, b in zip(run(model), expected)]
    print(f"saved task 'legal', jina_v4 vs peft: max abs difference {max(diffs):.1e}")
    assert max(diffs) <= FP32 * fp32_error(float64_copy(model), run)  # tolerances.py
    base = ref.encode_text(TEXTS, "retrieval", "query")
    assert (base - ref.encode_text(TEXTS, "legal", "query")).abs().max() > 1e-3  # the reference reads the new task


def test_scored_pairs_cosent(checkpoints, tmp_path):
    rows = [
        {"text1": f"sentence {i}", "text2": f"sentence {i} " + "more " * (i % 4), "score": (i % 4) / 3}
        for i in range(8)
    ]
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loss = run(
        "--model",
        checkpoints["gqa2-sharded"],
        "--data",
        data,
        "--task",
        "text-matching",
        "--steps",
        2,
        "--batch-size",
        8,
        "--minibatch",
        3,
        "--matryoshka-dims",
        8,
        64,
        "--out",
        tmp_path / "out",
    )
    assert 0 < loss < float("inf") and len(state(tmp_path / "out")["history"]) == 2
    # an existing task retrained: its saved tensors are the trained ones, every other task the source's
    source, out = checkpoints["gqa2-sharded"], tmp_path / "out"
    trained = state(out)["params"]
    with (
        safe_open(out / "adapters/adapter_model.safetensors", "pt") as new,
        safe_open(source / "adapters/adapter_model.safetensors", "pt") as old,
    ):
        assert set(new.keys()) == set(old.keys())
        for k in old.keys():  # CoSENT trains single vectors: the decoder's text-matching tensors, not the projector's
            moved = ".text-matching." in k and "multi_vector_projector" not in k
            assert torch.equal(new.get_tensor(k), old.get_tensor(k)) != moved, k
    after = JinaV4.from_pretrained(out, device="cpu", dtype="float32")
    assert after.config.task_names == ("retrieval", "text-matching", "code")
    for n, p in after.named_parameters():
        if n.endswith(".text-matching"):
            assert torch.equal(p, trained[n]), n  # the saved task is exactly the trained parameters
    before = JinaV4.from_pretrained(source, device="cpu", dtype="float32")
    texts = ["sentence 1", "another sentence entirely"]
    assert not torch.equal(
        after.encode_text(texts, task="text-matching"), before.encode_text(texts, task="text-matching")
    )
    for task in ("retrieval", "code"):
        assert torch.equal(after.encode_text(texts, task=task), before.encode_text(texts, task=task))


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], r"bad.jsonl: no rows \(the file is empty\)"),
        (['{"query": "q", "positive": "p"}', '{"query": "q2"}'], ":2: missing field 'positive'"),
        (
            ['{"query": "q", "positive": "p"}', "", '{"query": "q", "positive": "missing.png"}'],
            ":3: cannot read image .*missing.png",
        ),
        (['{"query": "q", "positive": "broken.jpg"}'], ":1: cannot read image .*broken.jpg .*UnidentifiedImageError"),
        (['{"query": "q", "positive": "p"}', "{not json"], ":2: not JSON"),
        (['{"query": "q", "positive": "p"}', '{"text1": "a", "text2": "b", "score": 1}'], ":2: a scored row in a file"),
        (['{"text1": "a", "text2": "b", "score": "high"}'], ":1: 'score' must be a number"),
        (['{"query": "q", "positive": "p", "negatives": [3]}'], r":1: negatives\[0\]: expected a text"),
    ],
)
def test_bad_data_names_the_line(tmp_path, lines, message):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(line + "\n" for line in lines))
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(SystemExit, match=message):  # the model does not exist: the data is checked first
        run("--model", tmp_path / "no-model", "--data", data, "--task", "t", "--steps", 1, "--out", tmp_path / "o")


def test_resume_after_interruption(checkpoints, tmp_path, monkeypatch):
    """Dropout on, GradCache on: a run killed in step 4 (saved at step 2) and rerun equals a straight run."""
    data = write_pairs(tmp_path / "data")
    args = [
        "--model",
        checkpoints["gqa2-sharded"],
        "--data",
        data,
        "--task",
        "legal",
        "--init-from",
        "retrieval",
        "--steps",
        5,
        "--save-every",
        2,
        "--batch-size",
        3,
        "--minibatch",
        2,
        "--lr",
        1e-2,
    ]
    run(*args, "--out", tmp_path / "straight")
    calls = []

    def crash(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return backward(*a, **k)

    monkeypatch.setattr(train_adapter, "backward", crash)
    with pytest.raises(KeyboardInterrupt):
        run(*args, "--out", tmp_path / "resumed")
    assert state(tmp_path / "resumed")["step"] == 2
    monkeypatch.setattr(train_adapter, "backward", backward)
    run(*args, "--out", tmp_path / "resumed")
    a, b = state(tmp_path / "straight"), state(tmp_path / "resumed")
    assert a["step"] == b["step"] == 5 and a["history"] == b["history"]
    assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
    run(*args, "--out", tmp_path / "resumed")  # a finished run: nothing to do
    assert state(tmp_path / "resumed")["history"] == a["history"]
    with pytest.raises(SystemExit, match=r"other settings \(lr\)"):
        run(*args[:-1], 3e-2, "--out", tmp_path / "resumed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worst_relative(ours: dict, theirs: dict) -> float:
    return max(((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max()).item() for k in theirs)


@pytest.mark.slow
def test_two_processes_equal_one_with_the_doubled_batch(checkpoints, tmp_path):
    ckpt = checkpoints["gqa2-sharded"]
    data = write_pairs(tmp_path / "data")
    args = [
        "--model",
        ckpt,
        "--data",
        data,
        "--task",
        "legal",
        "--init-from",
        "retrieval",
        "--steps",
        2,
        "--dropout",
        0,
        "--lr",
        1e-2,
        "--dtype",
        "float64",
        "--quiet",
    ]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(WORKER),
        str(ckpt),
        str(tmp_path),
        *map(str, args),
        "--batch-size",
        "2",
        "--out",
        str(tmp_path / "two"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # float64 on both sides: the same algorithm leaves float64 rounding only (1e-12: a thousand float64 ulps, as
    # the float64 parity tests); any difference in what is computed shows orders of magnitude above it
    model = JinaV4.from_pretrained(ckpt, device="cpu", dtype="float64")
    params = trainable(model, TASK)
    groups = [model.prepare(a[0] + b[0], TASK, a[1]) for a, b in zip(distributed_groups(0), distributed_groups(1))]
    two = torch.load(tmp_path / "grads.pt")
    for minibatch in (None, 2):
        loss = backward(model, groups, lambda e: loss_of(*e), minibatch).item()
        grads = {n: p.grad.clone() for n, p in params.items()}
        for p in params.values():
            p.grad = None
        loss_diff, grad_diff = abs(two[minibatch][0] - loss) / abs(loss), worst_relative(two[minibatch][1], grads)
        print(f"2 ranks x B vs 1 rank x 2B, minibatch {minibatch}: loss {loss_diff:.1e}, gradients {grad_diff:.1e}")
        assert loss_diff <= 1e-12 and grad_diff <= 1e-12

    run(*args, "--batch-size", 4, "--out", tmp_path / "one")
    a, b = state(tmp_path / "one"), state(tmp_path / "two")
    losses = max(abs(x - y) / abs(x) for x, y in zip(a["history"], b["history"]))
    params = max((a["params"][n] - b["params"][n]).abs().max().item() for n in a["params"])
    print(f"train_adapter.py, 2 processes vs 1: losses {losses:.1e} relative, adapter {params:.1e} absolute")
    assert len(a["history"]) == len(b["history"]) == 2 and losses <= 1e-12 and params <= 1e-12


def letters_task(seed: int = 0, train: int = 400, held_out: int = 50):
    """Query: 5 distinct lowercase letters; positive: the same letters through a fixed secret map to uppercase,
    shuffled. The model must learn the map (uppercase and lowercase are unrelated tokens), then generalise to
    letter sets it never saw."""
    rng = random.Random(seed)
    lower, upper = "abcdefghijklmnopqrstuvwxyz", list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    rng.shuffle(upper)

    def pair():
        ks = rng.sample(range(26), 5)
        return " ".join(lower[k] for k in ks), " ".join(upper[k] for k in rng.sample(ks, 5))

    return [pair() for _ in range(train)], [pair() for _ in range(held_out)]


def top1(model, task, pairs) -> float:
    q = model.encode_text([q for q, _ in pairs], task=task, prompt_name="query")
    p = model.encode_text([p for _, p in pairs], task=task, prompt_name="passage")
    return ((q @ p.T).argmax(1) == torch.arange(len(pairs))).float().mean().item()


@pytest.mark.slow
def test_it_learns(checkpoints, tmp_path):
    train, held_out = letters_task()
    data = tmp_path / "letters.jsonl"
    data.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in train))
    ckpt = checkpoints["gqa4-single"]
    base = top1(JinaV4.from_pretrained(ckpt), "retrieval", held_out)
    start = time.perf_counter()
    run(
        "--model",
        ckpt,
        "--data",
        data,
        "--task",
        "letters",
        "--init-from",
        "retrieval",
        "--steps",
        250,
        "--lr",
        3e-3,
        "--batch-size",
        32,
        "--save-every",
        1000,
        "--out",
        tmp_path / "out",
    )
    seconds = time.perf_counter() - start
    trained = top1(JinaV4.from_pretrained(tmp_path / "out"), "letters", held_out)
    print(f"top-1 on {len(held_out)} held-out pairs: base {base:.2f}, trained {trained:.2f} in {seconds:.1f} s")
    assert base <= 0.1 and trained >= 0.9
