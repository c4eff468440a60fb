"""scripts/synthetic.py: the demo checkpoint written with the core dependencies alone, and its two writers (jina_v4's
modules, the reference's modules) giving the same files byte for byte."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jina_v4 import JinaV4

SYNTHETIC = Path(__file__).parents[1] / "scripts" / "synthetic.py"
# The command with transformers and peft made unimportable: the demo writer must not need them.
WITHOUT_TRANSFORMERS = (
    "import runpy, sys; sys.modules['transformers'] = sys.modules['peft'] = None; "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.mark.parity
def test_both_writers_give_the_same_files(checkpoints, reference_checkpoints):
    """What the tests load through jina_v4 (checkpoints) is what the reference reads (reference_checkpoints)."""
    for name, ours in checkpoints.items():
        theirs = reference_checkpoints[name]
        assert files(ours) == files(theirs), name
        for f in files(ours):
            assert (ours / f).read_bytes() == (theirs / f).read_bytes(), f"{name}: {f} differs"


def test_demo_command_without_transformers(tmp_path):
    out = tmp_path / "demo-model"
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT_TRANSFORMERS, str(SYNTHETIC), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "random weights" in run.stdout
    assert files(out) == [
        "adapters/adapter_config.json",
        "adapters/adapter_model.safetensors",
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["task_names"] == ["retrieval", "text-matching", "code"]
    assert config["multi_vector_projector_dim"] == 128 and config["matryoshka_dims"] == [128, 256]
    model = JinaV4.from_pretrained(out, device="cpu")  # strict: every tensor used, every parameter filled
    v = model.encode_text(["a text", "another"], task="code", truncate_dim=128)
    m = model.encode_text("a text", task="retrieval", return_multivector=True)
    assert v.shape == (2, 128) and torch.isfinite(v).all() and m.shape[1] == 128
    again = tmp_path / "again"
    subprocess.run([sys.executable, str(SYNTHETIC), str(again)], check=True, capture_output=True, timeout=300)
    assert all((out / f).read_bytes() == (again / f).read_bytes() for f in files(out))  # same seed, same files


def test_demo_command_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    run = subprocess.run([sys.executable, str(SYNTHETIC), str(tmp_path / "f")], capture_output=True, text=True)
    assert run.returncode == 2 and "is a file" in run.stderr
