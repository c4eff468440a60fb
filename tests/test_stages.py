"""Stage files (jina_v4/apps/stages.py): jina_v4's stages equal the reference's (scripts/reference.py, hooks on the
transformers modules) within the fp32 stage tolerance; a bug planted in one decoder layer, one vision block or the
preprocessing is named at that stage and no earlier; two files of different dtypes are judged by the coarser
dtype's tolerance; the scripts write, read and compare the files (without transformers for --against)."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from jina_v4 import JinaV4
from jina_v4.apps import stages

from reference import Reference

SCRIPTS = Path(__file__).parents[1] / "scripts"
WITHOUT_TRANSFORMERS = (
    "import runpy, sys; sys.modules['transformers'] = sys.modules['peft'] = None; "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference_stages(checkpoints):
    """name -> (tensors, header) of the fp32 reference's stage file on the probe set."""
    cache = {}

    def get(name):
        if name not in cache:
            cases = stages.probe_cases()
            ref = Reference(checkpoints[name])
            tensors = {**ref.stages(cases), **stages.image_tensors(cases)}
            cache[name] = tensors, stages.header(name, checkpoints[name], "float32", "cpu", cases, "reference", {})
        return cache[name]

    return get


def fresh(checkpoints, name, dtype="float32") -> JinaV4:
    """A model of its own, to plant a bug in."""
    return JinaV4.from_pretrained(checkpoints[name], device="cpu", dtype=dtype)


def report_for(model, checkpoints, name, reference_stages) -> stages.Report:
    ours = stages.record_model(model, name, checkpoints[name])
    return stages.compare(*ours, *reference_stages(name))


def expected_stages(model) -> set:
    return {
        *stages.PREPROCESSING,
        "visual.patch_embed",
        *(f"visual.blocks.{i}" for i in range(model.config.vision_config.depth)),
        "visual.merger",
        "embeddings",
        *(f"decoder.layers.{i}" for i in range(model.config.text_config.num_hidden_layers)),
        "decoder.norm",
        "single",
        "multi",
    }


def assert_first(report: stages.Report, stage: str) -> None:
    """`stage` is out of tolerance, and every stage before it, in every case, is within."""
    first = report.first_failure
    assert first is not None and first.stage == stage, stages.format_report(report)
    earlier = [r for r in report.rows if stages.stage_rank(r.stage) < stages.stage_rank(stage)]
    assert earlier and all(r.ok for r in earlier)
    assert f"FIRST STAGE OUT OF TOLERANCE: {stage} " in stages.format_report(report)


@pytest.mark.parity
def test_jina_v4_stages_equal_the_reference(name, checkpoints, models, reference_stages):
    model = models(name)
    report = report_for(model, checkpoints, name, reference_stages)
    assert report.ok, stages.format_report(report)
    assert {r.stage for r in report.rows} == expected_stages(model)
    assert not report.only_a and not report.only_b
    cases = {r.case for r in report.rows if r.stage == "visual.blocks.0"}
    assert cases == {"document", "thin", "mixed"}  # every image case went through the tower
    assert report.stage("input_ids")[0].note == "equal"


@pytest.mark.parity
def test_bug_in_one_decoder_layer_is_named_there(checkpoints, reference_stages):
    model = fresh(checkpoints, "gqa4-single")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.01)  # a 1% slip in one weight of layer 1
    assert_first(report_for(model, checkpoints, "gqa4-single", reference_stages), "decoder.layers.1")


@pytest.mark.parity
def test_bug_in_one_vision_block_is_named_there(checkpoints, reference_stages):
    model = fresh(checkpoints, "gqa4-single")
    block = model.visual.blocks[2]
    plain = block.forward

    def swapped_halves(x, cos, sin, seqs):  # the rotary's sin with its sign flipped: a classic port bug
        return plain(x, cos, -sin, seqs)

    block.forward = swapped_halves
    report = report_for(model, checkpoints, "gqa4-single", reference_stages)
    assert_first(report, "visual.blocks.2")
    assert all(r.ok for r in report.rows if r.case in ("text", "code"))  # text never enters the tower


@pytest.mark.parity
def test_bug_in_preprocessing_is_named_there(checkpoints, reference_stages):
    model = fresh(checkpoints, "gqa2-sharded")
    cfg = model.processor.image_cfg
    model.processor.image_cfg = dataclasses.replace(cfg, image_std=(0.5, 0.5, 0.5))  # the wrong normalisation
    assert_first(report_for(model, checkpoints, "gqa2-sharded", reference_stages), "pixel_values")

    model = fresh(checkpoints, "gqa2-sharded")
    tasks = dict(model.config.tasks)
    tasks["retrieval"] = dataclasses.replace(tasks["retrieval"], query="Passage: ")  # the wrong prompt
    model.config = dataclasses.replace(
        model.config, task_prompts={t.name: {"query": t.query, "passage": t.passage} for t in tasks.values()}
    )
    report = report_for(model, checkpoints, "gqa2-sharded", reference_stages)
    assert report.first_failure.stage == "input_ids" and report.first_failure.case == "text"


def test_files_of_two_dtypes_take_the_coarser_tolerance(checkpoints, models, tmp_path):
    name = "mha-bf16"
    for dtype in ("float32", "bfloat16"):
        stages.save(
            tmp_path / f"{dtype}.safetensors", *stages.record_model(models(name, dtype), name, checkpoints[name])
        )
    a, meta_a = stages.load(tmp_path / "bfloat16.safetensors")
    b, meta_b = stages.load(tmp_path / "float32.safetensors")
    assert meta_a["dtype"] == "bfloat16" and meta_b["dtype"] == "float32"
    assert meta_a["stages"][0] == "input_ids" and meta_a["stages"][-1] == "multi"
    report = stages.compare(a, meta_a, b, meta_b)
    assert report.dtype == "bfloat16" and report.ok, stages.format_report(report)
    # the same numbers under fp32's tolerance: bf16 storage shows from the first stage computed in the model dtype
    strict = stages.compare(a, meta_a, b, meta_b, "float32")
    assert not strict.ok and strict.first_failure.stage == "visual.patch_embed"
    assert all(r.ok for r in strict.rows if r.stage in stages.PREPROCESSING)
    assert stages.coarser("float32", "float16") == "float16" and stages.coarser("float16", "bfloat16") == "bfloat16"

    out = run(
        "parity.py", "--stages-a", tmp_path / "bfloat16.safetensors", "--stages-b", tmp_path / "float32.safetensors"
    )
    assert out.returncode == 0 and "tolerance bfloat16" in out.stdout, out.stdout + out.stderr
    out = run(
        "parity.py",
        "--stages-a",
        tmp_path / "bfloat16.safetensors",
        "--stages-b",
        tmp_path / "float32.safetensors",
        "--tolerance",
        "float32",
    )
    assert out.returncode == 1 and "FIRST STAGE OUT OF TOLERANCE: visual.patch_embed" in out.stdout


def run(script, *args, block_transformers=False):
    path = str(SCRIPTS / script)
    cmd = [sys.executable, "-c", WITHOUT_TRANSFORMERS, path] if block_transformers else [sys.executable, path]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=600)


def test_scripts_write_and_compare_stage_files(checkpoints, tmp_path):
    ckpt, ref_file, ours = checkpoints["gqa2-sharded"], tmp_path / "ref.safetensors", tmp_path / "ours.safetensors"
    out = run("reference.py", "--model", ckpt, "--dtype", "float32", "-o", ref_file)
    assert out.returncode == 0, out.stderr[-2000:]
    tensors, meta = stages.load(ref_file)
    assert meta["implementation"].startswith("transformers 4.52.4 + peft 0.15.2")
    assert meta["dtype"] == "float32" and meta["cases"][0]["inputs"][2] == {"text": stages.TEXTS[2]}
    assert meta["revision"].startswith("local gqa2-sharded") and meta["preprocessing"]["max_pixels"] > 0
    assert tensors["input/document/image.0"].dtype == torch.uint8

    args = ("--stages", "--model", ckpt, "--device", "cpu")
    out = run("parity.py", *args, "--against", ref_file, block_transformers=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "within the float32 tolerance" in out.stdout

    out = run("parity.py", *args, "--dtype", "float32", "--save", ours, block_transformers=True)
    assert out.returncode == 0 and stages.load(ours)[1]["implementation"].startswith("jina_v4")

    altered = load_file(ref_file)
    altered["mixed/decoder.layers.0"][5] += 0.05  # one token of one case
    save_file(altered, ref_file, metadata={"header": __import__("json").dumps(meta)})
    out = run("parity.py", "--stages-a", ours, "--stages-b", ref_file)
    assert out.returncode == 1
    assert "FIRST STAGE OUT OF TOLERANCE: decoder.layers.0 (case mixed" in out.stdout
    line = next(x for x in out.stdout.splitlines() if x.startswith("decoder.layers.0 "))
    assert line.endswith("FAIL") and "mixed:5" in line  # the worst token is the altered one


def test_a_file_that_is_not_a_stage_file_is_refused(tmp_path):
    save_file({"x": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not a stage file"):
        stages.load(tmp_path / "x.safetensors")
    (tmp_path / "y.safetensors").write_bytes(b"nonsense")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        stages.load(tmp_path / "y.safetensors")


def test_window_order_back_to_rows():
    index = torch.tensor([2, 0, 3, 1])  # window order of 4 merge units
    rows = torch.arange(16.0).view(16, 1)  # processor order, 4 patches per unit
    windowed = rows.view(4, 4, 1)[index].view(16, 1)  # as the tower permutes them
    assert torch.equal(stages.windows_to_rows(windowed, index, 4), rows)
