"""scripts/parity.py end to end on a tiny checkpoint: --save, then --against without transformers, and a
deliberately altered reference file failing."""

import subprocess
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

PARITY = Path(__file__).parents[1] / "scripts" / "parity.py"
# Run parity.py with transformers and peft made unimportable: --against must not need them.
WITHOUT_TRANSFORMERS = (
    "import runpy, sys; sys.modules['transformers'] = sys.modules['peft'] = None; "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def run(*args, block_transformers=False):
    cmd = (
        [sys.executable, "-c", WITHOUT_TRANSFORMERS, str(PARITY)]
        if block_transformers
        else [sys.executable, str(PARITY)]
    )
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=600)


def test_save_then_against_then_altered(checkpoints, tmp_path):
    ckpt, ref_file = checkpoints["mha-bf16"], tmp_path / "ref.safetensors"
    out = run("--model", ckpt, "--device", "cpu", "--dtype", "float32", "--save", ref_file)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "96/96 outputs pass (float32" in out.stdout
    with safe_open(ref_file, "pt") as f:
        assert "input/image/4" in f.keys() and "Overview of climate change" in f.metadata()["texts"]

    out = run("--model", ckpt, "--device", "cpu", "--against", ref_file, block_transformers=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "96/96 outputs pass (float32" in out.stdout

    tensors = load_file(ref_file)
    with safe_open(ref_file, "pt") as f:
        meta = f.metadata()
    tensors["output/code/image/2/single"] = -tensors["output/code/image/2/single"]
    tensors["output/retrieval/text/0/multi"][3] += 0.01
    save_file(tensors, ref_file, metadata=meta)
    out = run("--model", ckpt, "--device", "cpu", "--against", ref_file, block_transformers=True)
    assert out.returncode == 1
    failed = [line.split()[0] for line in out.stdout.splitlines() if line.endswith("FAIL")]
    assert failed == ["code/image/2/single", "retrieval/text/0/multi"]
    assert "94/96 outputs pass" in out.stdout


def test_bf16_against_fp32_reference(checkpoints):
    out = run(
        "--model", checkpoints["gqa2-sharded"], "--device", "cpu", "--dtype", "bfloat16", "--reference-dtype", "float32"
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "96/96 outputs pass (bfloat16" in out.stdout
