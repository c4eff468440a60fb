"""`jina-v4 export` (jina_v4/apps/export.py): transformers' own Qwen2_5_VLForConditionalGeneration and
Qwen2ForCausalLM load the exports, and their final hidden states, pooled as the released code pools them (text:
all tokens; image: vision_start .. vision_end), equal jina_v4's single vectors for the task within the fp32
tolerance; the projector file gives the multi-vectors; a task trained by scripts/train_adapter.py exports too."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM

from jina_v4 import JinaV4
from jina_v4.apps import cli
from jina_v4.apps.export import PROJECTOR_FILE, export

import train_adapter
from test_images import picture
from test_text_parity import TEXTS
from test_train_adapter import write_pairs
from tolerances import FP32, float64_copy, fp32_error, max_diff

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.parity]
IMAGES = [picture(100, 140, 1), picture(56, 300, 2)]


def load(cls, directory):
    return cls.from_pretrained(directory, torch_dtype=torch.float32, attn_implementation="sdpa").eval()


@torch.no_grad()
def exported_vectors(hf, model, items, projector=None):
    """Each item through the exported model alone: (single vectors, multi-vectors) pooled as the released code
    pools (text: every token; image: vision_start .. vision_end), the projector applied to every token."""
    single, multi = [], []
    for it in items:
        kw = {}
        if it.grid is not None:
            kw = {"pixel_values": it.pixel_values, "image_grid_thw": torch.tensor([it.grid])}
        h = hf(input_ids=torch.tensor([it.input_ids]), output_hidden_states=True, **kw).hidden_states[-1][0]
        if it.grid is None:
            rows = h
        else:
            a = it.input_ids.index(model.config.vision_start_token_id)
            rows = h[a : it.input_ids.index(model.config.vision_end_token_id) + 1]
        single.append(F.normalize(rows.mean(0), dim=-1))
        if projector is not None:
            multi.append(F.normalize(h @ projector["weight"].T + projector["bias"], dim=-1))
    return torch.stack(single), multi


def inputs(model, task):
    texts = model.prepare([{"text": t} for t in TEXTS], task, "query") + model.prepare(
        [{"text": t} for t in TEXTS[:3]], task, "passage"
    )
    return texts, model.prepare([{"image": x} for x in IMAGES], task)


def check_export(model, source, task, tmp_path, tolerance):
    """Both formats of `task`: the exports' pooled states against jina_v4's vectors, within tolerance(kind)."""
    texts, images = inputs(model, task)
    ours = model.encode_items(texts + images)
    ours_multi = model.encode_items(texts + images, return_multivector=True)

    vllm = export(model, source, task, "vllm", tmp_path / "vllm")
    projector = load_file(vllm / PROJECTOR_FILE)
    single, multi = exported_vectors(load(Qwen2_5_VLForConditionalGeneration, vllm), model, texts + images, projector)
    assert max_diff(single, ours) <= FP32 * tolerance("text", "image")
    assert max_diff(multi, ours_multi) <= FP32 * tolerance("text-multi", "image-multi")

    text = export(model, source, task, "text", tmp_path / "text")
    hf = load(Qwen2ForCausalLM, text)
    assert not any("visual" in k for k in load_file(text / "model.safetensors"))
    single, _ = exported_vectors(hf, model, texts)
    assert max_diff(single, ours[: len(texts)]) <= FP32 * tolerance("text")
    return vllm, text


def test_exports_equal_jina_v4(name, checkpoints, models, rounding, tmp_path):
    model = models(name)
    vllm, text = check_export(model, checkpoints[name], "code", tmp_path, lambda *kinds: rounding(name, *kinds))
    config = json.loads((vllm / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"] and "task_names" not in config
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "README.md"} <= {
        p.name for p in vllm.iterdir()
    }
    assert json.loads((text / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert "queries: `Query: ` + text; passages: `Passage: ` + text" in (text / "README.md").read_text()
    assert not any(".lora_" in k for k in load_file(vllm / "model.safetensors"))
    # exporting merged a copy of the weights: the model still runs every task unmerged
    assert all(m.merged_task is None for m in map(model.get_submodule, model.adapted))


def test_symmetric_task_prompt_rule(checkpoints, models, tmp_path):
    text = export(models("gqa2-sharded"), checkpoints["gqa2-sharded"], "text-matching", "text", tmp_path / "t")
    assert "every text, on both sides: `Query: ` + text" in (text / "README.md").read_text()


def test_a_trained_task_exports(checkpoints, tmp_path):
    data = write_pairs(tmp_path / "data")
    out = tmp_path / "trained"
    args = ["--model", checkpoints["gqa4-single"], "--data", data, "--task", "legal", "--init-from", "retrieval"]
    args += ["--query-prefix", "Legal question: ", "--passage-prefix", "Statute: ", "--steps", 2, "--batch-size", 4]
    train_adapter.main([str(a) for a in [*args, "--lr", 1e-2, "--out", out, "--quiet"]])
    model = JinaV4.from_pretrained(out, device="cpu", dtype="float32")
    assert "legal" in model.tasks
    wide = float64_copy(model)
    texts, images = inputs(model, "legal")

    def tolerance(*kinds):  # this checkpoint's own E over the exported task's outputs
        multi = any(k.endswith("multi") for k in kinds)
        batch = texts + (images if any(k.startswith("image") for k in kinds) else [])
        return fp32_error(wide, lambda m: m.encode_items(batch, return_multivector=multi))

    vllm, text = check_export(model, out, "legal", tmp_path, tolerance)
    readme = (text / "README.md").read_text()
    assert "queries: `Legal question: ` + text; passages: `Statute: ` + text" in readme
    base = JinaV4.from_pretrained(checkpoints["gqa4-single"], device="cpu", dtype="float32")
    retrieval = export(base, checkpoints["gqa4-single"], "retrieval", "text", tmp_path / "retrieval")
    assert not torch.equal(  # the trained adapter, not its starting copy, is what was merged
        load_file(text / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"],
        load_file(retrieval / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"],
    )


def test_export_refusals_and_cli(checkpoints, models, tmp_path, capsys):
    model = models("gqa2-sharded")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(ValueError, match="not an empty directory"):
        export(model, checkpoints["gqa2-sharded"], "code", "vllm", tmp_path / "busy")
    with pytest.raises(ValueError, match="legal"):
        export(model, checkpoints["gqa2-sharded"], "legal", "vllm", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    args = ["export", "--model", str(checkpoints["gqa2-sharded"]), "--task", "code", "--format", "text"]
    assert cli.main([*args, "-o", str(tmp_path / "cli")]) == 0
    assert "wrote the text export of task 'code'" in capsys.readouterr().err
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    assert cli.main([*args, "-o", str(tmp_path / "busy")]) == 1
    assert "not an empty directory" in capsys.readouterr().err
