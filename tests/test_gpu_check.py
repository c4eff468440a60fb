"""scripts/gpu_check.py on a tiny checkpoint on the CPU, so that the GPU check cannot rot: every phase runs and
fills its JSON section, parity holds (fp32 at the tests' tolerance, bf16 within scripts/parity.py's bf16 gates,
the varlen switch falling back to the very same outputs on a CPU, deterministic mode bit-identical across batch
compositions), a failing phase is recorded while the next one runs, and the time budget skips phases."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One `--tiny --device cpu` run in a subprocess, as on the device machine (PYTHONPATH=the repository)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--out", str(out), "--dir", str(tmp / "ckpt")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    return proc, out, tmp


def test_every_phase_runs_and_reports(tiny_run):
    proc, out, _ = tiny_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    import gpu_check

    assert list(report["phases"]) == gpu_check.PHASES
    assert all(p["status"] == "ok" and p["seconds"] >= 0 for p in report["phases"].values()), report["phases"]
    for line in ("parity, bf16 vs ref fp32: single cosine, worst", "speed: text tokens/s", "deterministic"):
        assert line in proc.stdout
    assert "[speed] ok in" in proc.stdout  # the elapsed time of each phase
    env = report["env"]
    assert env["device"] == "cpu" and env["transformers"][0].isdigit() and env["sizes"]["probe_tokens"] == [8, 40, 300]

    ckpt = report["phases"]["checkpoint"]
    assert ckpt["parameters"] > 0 and ckpt["init"].startswith(gpu_check.INIT)
    act = report["phases"]["activations"]
    assert act["non_finite"] == 0 and 0.5 < act["final_rms"] < 2  # RMSNorm weights are 1 ± 0.05
    assert len(act["residual_rms_by_layer"]) == 3  # the embeddings, after each of the 2 layers, the final norm


def test_the_cpu_and_emulated_bf16_are_named(tiny_run):
    """On a CPU: its capability first, and the bf16 speed rows marked where the CPU emulates bf16 (the table
    redrawn from the run's report with either answer, whatever this CPU has)."""
    import gpu_check

    proc, out, _ = tiny_run
    report = json.loads(out.read_text())
    cpu = report["env"]["cpu"]
    assert cpu["capability"] == torch.backends.cpu.get_cpu_capability()
    assert f"CPU capability {cpu['capability']}, bf16 {cpu['bf16']}" in proc.stdout
    for bf16, marked in (("AVX512-BF16", False), ("emulated", True)):
        report["env"]["cpu"]["bf16"] = bf16
        lines = gpu_check.table(report).splitlines()
        speed = [line for line in lines if line.startswith("speed: ")]
        assert lines[0] == f"CPU capability {cpu['capability']}, bf16 {bf16}" and len(speed) == 5
        assert all(("[bf16 emulated]" in line) == marked for line in speed)


def test_parity_on_the_tiny_model(tiny_run):
    from jina_v4 import JinaV4

    import gpu_check
    from parity import THRESHOLDS
    from tolerances import FP32, float64_copy, fp32_error

    report = json.loads(tiny_run[1].read_text())
    parity = report["phases"]["parity"]
    # the fp32 bound of this checkpoint on this probe (tolerances.py): FP32 x E
    model = JinaV4.from_pretrained(report["phases"]["checkpoint"]["path"], device="cpu", dtype="float32")
    items, _ = gpu_check.probe_set(model, gpu_check.parse_args(["--tiny", "--device", "cpu"]))
    tol = FP32 * fp32_error(float64_copy(model), lambda m: gpu_check.encode_both(m, items))
    assert parity["reference"].startswith("transformers ")  # the reference ran, not jina_v4's fp32 stand-in
    assert parity["probe"]["text_tokens"] == [8, 40, 300] and len(parity["probe"]["pages"]) == 2
    assert parity["probe"]["outputs"] == 2 * 3 * (3 + 2)  # single + multi, 3 tasks, 3 texts + 2 pages
    for head in ("single", "multi"):
        for kind in ("all", "text", "page"):
            assert parity["fp32"][head][kind]["max_abs"] <= tol
        assert parity["varlen_vs_padded"][head]["all"]["max_abs"] == 0  # a CPU keeps one attention path
    gate = THRESHOLDS["bfloat16"]
    for path in ("bf16_padded", "bf16_varlen"):
        assert parity[path]["single"]["all"]["cos_min"] >= gate["single"]
        assert parity[path]["multi"]["all"]["cos_min"] >= gate["multi_min"]
        assert parity[path]["multi"]["all"]["output_mean_min"] >= gate["multi_mean"]
    assert parity["fp32_pass"] and parity["bf16_gate_pass"] and parity["finite"]


def test_speed_flops_deterministic_sections(tiny_run):
    phases = json.loads(tiny_run[1].read_text())["phases"]
    speed = phases["speed"]
    for col in ("jina_v4_padded", "jina_v4_varlen", "reference"):
        assert speed[col]["tokens_per_s"] > 0 and speed[col]["pages_per_s"] > 0
        assert speed[col]["text_flop_fraction"] > 0
    assert speed["corpus"]["texts"] == 16 + 3 and speed["pages"]["n"] == 2
    flops = phases["flops"]
    assert flops["matmul_square_tflops"] > 0 and flops["forward_fraction"] > 0
    det = phases["deterministic"]
    assert det["deterministic"]["bit_identical"] and det["deterministic"]["max_abs"] == 0  # guaranteed on a CPU
    assert "bit_identical" in det["default"]


def test_a_failing_phase_is_recorded_and_the_next_one_runs(tiny_run, capsys):
    import gpu_check

    out = tiny_run[2] / "failing.json"
    args = [
        "--tiny",
        "--device",
        "cpu",
        "--dir",
        str(tiny_run[2] / "ckpt"),
        "--out",
        str(out),
        "--phases",
        "parity",
        "flops",
        "--probe-pages",
        "9x2000",
    ]  # aspect over 200: parity fails
    assert gpu_check.main(args) == 1
    phases = json.loads(out.read_text())["phases"]
    assert phases["checkpoint"]["status"] == "ok" and phases["checkpoint"]["reused"]
    assert phases["parity"]["status"] == "error" and "aspect ratio" in phases["parity"]["error"]
    assert phases["flops"]["status"] == "ok" and list(phases) == ["checkpoint", "parity", "flops"]
    assert "parity           error" in capsys.readouterr().out


def test_the_budget_skips_phases_but_not_the_checkpoint(tiny_run):
    import gpu_check

    out = tiny_run[2] / "budget.json"
    args = [
        "--tiny",
        "--device",
        "cpu",
        "--dir",
        str(tiny_run[2] / "ckpt"),
        "--out",
        str(out),
        "--phases",
        "activations",
        "--budget",
        "0",
    ]
    assert gpu_check.main(args) == 0
    phases = json.loads(out.read_text())["phases"]
    assert phases["checkpoint"]["status"] == "ok" and phases["activations"]["status"] == "skipped"


def test_scaled_init_keeps_each_layer_at_unit_gain():
    """The weights' statistics that `scaled_init` documents, on full-size shapes."""
    import gpu_check

    init = gpu_check.scaled_init(0, torch.device("cpu"))
    q = init("model.layers.0.self_attn.q_proj.weight", torch.Size([2048, 2048])).float()
    assert abs(q.std().item() * 2048**0.5 - 1) < 0.01
    conv = init("visual.patch_embed.proj.weight", torch.Size([1280, 3, 2, 14, 14])).float()
    assert abs(conv.std().item() * 1176**0.5 - 1) < 0.01
    norm = init("visual.blocks.3.norm2.weight", torch.Size([1280])).float()
    assert abs(norm.mean().item() - 1) < 0.01 and abs(norm.std().item() - 0.05) < 0.005
    assert abs(init("visual.merger.ln_q.weight", torch.Size([1280])).float().mean().item() - 1) < 0.01
    assert abs(init("model.layers.0.self_attn.q_proj.bias", torch.Size([4096])).float().std().item() - 0.02) < 0.002
    b = init("model.layers.0.mlp.up_proj.lora_B.code", torch.Size([11008, 32])).float()
    assert abs(b.std().item() * 32**0.5 - gpu_check.LORA_B) < 0.01
    x = torch.randn(64, 2048)  # a Linear of this init keeps the RMS of its input
    assert abs((x @ q.T).pow(2).mean().sqrt().item() - 1) < 0.05


@pytest.mark.parametrize("reference", ["missing", "broken"])
def test_without_the_reference_and_with_a_failing_varlen_kernel(tiny_run, monkeypatch, reference):
    """transformers or peft missing, or the reference failing: parity compares bf16 with jina_v4's own fp32 and
    speed has no reference column. A varlen path that raises is recorded; the padded figures stay."""
    from jina_v4 import JinaV4, execution

    import gpu_check

    encode_items = JinaV4.encode_items

    def failing_varlen(self, *a, **kw):
        if execution.current().attention == "varlen":
            raise RuntimeError("varlen kernel failed")
        return encode_items(self, *a, **kw)

    def broken(ctx, dtype):
        raise RuntimeError("reference broke")

    monkeypatch.setattr(JinaV4, "encode_items", failing_varlen)
    if reference == "missing":
        monkeypatch.setitem(sys.modules, "reference", None)  # `from reference import ...` raises ImportError
    else:
        monkeypatch.setattr(gpu_check, "reference", broken)
    out = tiny_run[2] / f"{reference}.json"
    args = [
        "--tiny",
        "--device",
        "cpu",
        "--dir",
        str(tiny_run[2] / "ckpt"),
        "--out",
        str(out),
        "--phases",
        "parity",
        "speed",
        "--probe-tokens",
        "8",
        "--probe-pages",
        "224x224",
        "--queries",
        "2",
        "--passages",
        "1",
        "--passage-tokens",
        "50",
        "60",
        "--pages",
        "1",
    ]
    assert gpu_check.main(args) == 0
    phases = json.loads(out.read_text())["phases"]
    parity, speed = phases["parity"], phases["speed"]
    assert parity["status"] == "ok" and parity["reference"].startswith("none (")
    assert parity["fp32"]["multi"]["all"]["max_abs"] == 0  # compared with itself
    assert parity["bf16_padded"]["single"]["all"]["cos_min"] >= 0.999
    assert parity["varlen_error"] == "RuntimeError: varlen kernel failed" and "bf16_varlen" not in parity
    assert speed["status"] == "ok" and speed["jina_v4_padded"]["tokens_per_s"] > 0 and "jina_v4_varlen" not in speed
    assert speed["varlen_error"] == "RuntimeError: varlen kernel failed"
    if reference == "missing":
        assert parity["reference"].startswith("none (ModuleNotFoundError")
        assert speed["reference"].startswith("none (ModuleNotFoundError")
    else:
        assert parity["reference_error"] == speed["reference_error"] == "RuntimeError: reference broke"
        assert "reference" not in speed
