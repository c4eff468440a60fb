"""Loading: the released layout at full size (meta device), the newer layout, the hub path, and every
checkpoint error naming what is wrong."""

import json
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.models.qwen2_5_vl import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

from jina_v4 import AdapterConfig, CheckpointError, ConfigError, JinaV4, JinaV4Config
from jina_v4.model import loading
from jina_v4.model.loading import adapter_key, adapter_name

from synthetic import RELEASED

TASKS = ["retrieval", "text-matching", "code"]


@pytest.fixture(scope="module")
def full_size():
    config = JinaV4Config.from_dict(json.loads((RELEASED / "config.json").read_text()))
    adapters = AdapterConfig.from_dict(json.loads((RELEASED / "adapters" / "adapter_config.json").read_text()))
    with torch.device("meta"):
        model = JinaV4(config, adapters)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_full_size_base_tensors(full_size):
    """Names and shapes equal transformers' Qwen2.5-VL in the released (pre-4.52) key layout, plus the projector."""
    base = {k: s for k, s in full_size.items() if ".lora_" not in k}
    cfg = Qwen2_5_VLConfig.from_dict(json.loads((RELEASED / "config.json").read_text()), attn_implementation="sdpa")
    with torch.device("meta"):
        hf = Qwen2_5_VLModel._from_config(cfg, attn_implementation="sdpa")
    expected = {}
    for k, v in hf.state_dict().items():
        k = "model." + k[len("language_model.") :] if k.startswith("language_model.") else k
        expected[k] = tuple(v.shape)
    expected.update({"multi_vector_projector.weight": (128, 2048), "multi_vector_projector.bias": (128,)})
    assert base == expected
    assert len(base) == 826
    assert sum(torch.Size(s).numel() for s in base.values()) == 3_754_885_248


def test_full_size_adapter_tensors(full_size):
    lora = {k: s for k, s in full_size.items() if ".lora_" in k}
    assert len(lora) == 1518
    for task in TASKS:
        assert sum(torch.Size(s).numel() for k, s in lora.items() if k.endswith("." + task)) == 59_936_768
    # the released adapter file's names map exactly onto these parameters, and back
    released = [
        f"base_model.model.model.language_model.layers.{i}.{m}.lora_{ab}.{t}.weight"
        for i in range(36)
        for m in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
        for ab in "AB"
        for t in TASKS
    ]
    released += [f"base_model.model.multi_vector_projector.lora_{ab}.{t}.weight" for ab in "AB" for t in TASKS]
    assert sorted(adapter_name(k) for k in released) == sorted(lora)
    assert sorted(adapter_key(k) for k in lora) == sorted(released)
    assert lora["model.layers.0.mlp.down_proj.lora_A.code"] == (32, 11008)
    assert lora["multi_vector_projector.lora_B.retrieval"] == (128, 32)


@pytest.mark.parametrize("native", ["AVX512-BF16", None])
def test_dtype_default_and_override(checkpoints, monkeypatch, native):
    """dtype=None: a bf16 checkpoint stays bf16 on a CPU that multiplies bf16 natively, and runs in float32 where
    torch would emulate bf16; asking for bf16 there works, with one warning that names the slowdown."""
    monkeypatch.setattr(loading, "native_bf16", lambda: native)
    m = JinaV4.from_pretrained(checkpoints["mha-bf16"], device="cpu")
    want = torch.bfloat16 if native else torch.float32
    assert m.dtype == want and m.multi_vector_projector.lora_A["code"].dtype == want
    assert ("natively: AVX512-BF16" if native else "no native bf16 matmul") in m.dtype_reason
    assert JinaV4.from_pretrained(checkpoints["gqa2-sharded"], device="cpu").dtype == torch.float32
    assert JinaV4.from_pretrained(checkpoints["mha-bf16"], device="cpu", dtype="float32").dtype == torch.float32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own filter: once per calling line
        for _ in range(2):
            m = JinaV4.from_pretrained(checkpoints["mha-bf16"], device="cpu", dtype="bf16")
            assert m.dtype == torch.bfloat16
    assert [str(w.message) for w in caught] == (
        [] if native else ["dtype=bfloat16: " + loading.EMULATED]
    ) and "up to 7x slower" in loading.EMULATED
    with pytest.raises(ValueError, match="dtype='int8'"):
        JinaV4.from_pretrained(checkpoints["mha-bf16"], device="cpu", dtype="int8")


@pytest.mark.parametrize(
    "machine,amx,avx512_bf16,features,native",
    [
        ("x86_64", False, False, None, None),  # AVX2 (AMD Zen 3, most laptops): emulated
        ("x86_64", False, True, None, "AVX512-BF16"),  # AMD Zen 4, Intel Cooper Lake and later
        ("AMD64", True, True, None, "AMX"),  # Intel Sapphire Rapids and later
        ("aarch64", False, False, "fp asimd sve bf16 i8mm", "BF16"),  # Graviton3, Neoverse V1/N2
        ("aarch64", False, False, "fp asimd evtstrm aes crc32", None),  # Graviton2, Neoverse N1
        ("arm64", False, False, None, None),  # macOS: no /proc/cpuinfo, counted as emulating
        ("riscv64", False, False, "bf16", None),
    ],
)
def test_native_bf16_reads_the_cpu(monkeypatch, tmp_path, machine, amx, avx512_bf16, features, native):
    """native_bf16() from what it reads (the machine, torch's cpuinfo flags, /proc/cpuinfo), never this CPU."""
    monkeypatch.setattr(loading.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    cpuinfo = tmp_path / "cpuinfo"
    if features is not None:
        cpuinfo.write_text(f"processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\n")
    monkeypatch.setattr(loading, "CPUINFO", cpuinfo)
    assert loading.native_bf16() == native
    cpu, cuda, bf16 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16
    assert loading.choose_dtype(cpu, bf16, None)[0] == (bf16 if native else torch.float32)
    assert loading.choose_dtype(cuda, bf16, None) == (bf16, "the checkpoint's dtype")
    assert loading.choose_dtype(cpu, torch.float32, None)[0] == torch.float32
    assert loading.choose_dtype(cpu, bf16, torch.float64) == (torch.float64, "as asked")


def copy(checkpoints, tmp_path, name="gqa4-single"):
    return shutil.copytree(checkpoints[name], tmp_path / name)


def test_newer_transformers_layout(checkpoints, models, tmp_path):
    path = copy(checkpoints, tmp_path)
    w = load_file(path / "model.safetensors")
    renamed = {
        (
            "model.language_model." + k[6:]
            if k.startswith("model.")
            else "model." + k
            if k.startswith("visual.")
            else k
        ): v
        for k, v in w.items()
    }
    save_file(renamed, path / "model.safetensors")
    text = ["a text", "another, longer text"]
    got = JinaV4.from_pretrained(path, device="cpu").encode_text(text, task="code")
    assert torch.equal(got, models("gqa4-single").encode_text(text, task="code"))


def test_hub_repo_id_from_local_cache(checkpoints, models, tmp_path, monkeypatch):
    """The huggingface_hub path, exercised offline with a cache laid out as the hub writes it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "cache" / "models--tiny-org--tiny-v4"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(checkpoints["gqa2-sharded"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    m = JinaV4.from_pretrained("tiny-org/tiny-v4", device="cpu", cache_dir=tmp_path / "cache")
    assert torch.equal(m.encode_text("x", task="code"), models("gqa2-sharded").encode_text("x", task="code"))
    with pytest.raises(FileNotFoundError, match="tiny-org/missing: cannot fetch from the hub"):
        JinaV4.from_pretrained("tiny-org/missing", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        JinaV4.from_pretrained(str(tmp_path / "nowhere"))


def test_hub_error_whole_with_the_ways_out(tmp_path, monkeypatch):
    """A network error of several lines reaches the user whole, followed by what to do without the hub."""
    import huggingface_hub

    def unreachable(repo_id, **kw):
        raise ConnectionError("Cannot reach the hub\nGot: ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(FileNotFoundError) as e:
        JinaV4.from_pretrained("tiny-org/tiny-v4", cache_dir=tmp_path / "cache")
    lines = str(e.value).splitlines()
    assert lines[:2] == [
        "tiny-org/tiny-v4: cannot fetch from the hub (ConnectionError: Cannot reach the hub",
        "Got: ConnectError: [Errno -2] Name or service not known)",
    ]
    rest = "\n".join(lines[2:])
    assert "--model DIR" in rest and "from_pretrained(DIR)" in rest and "released layout" in rest
    assert f"the hub cache, {tmp_path / 'cache'}" in rest and "HF_HUB_OFFLINE=1" in rest


def test_missing_shard(checkpoints, tmp_path):
    path = copy(checkpoints, tmp_path, "gqa2-sharded")
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="names shard 'model-00002-of-00002.safetensors', which is missing"):
        JinaV4.from_pretrained(path, device="cpu")


def rewrite(path, fn):
    w = load_file(path / "model.safetensors")
    fn(w)
    save_file(w, path / "model.safetensors")


def test_missing_tensor(checkpoints, tmp_path):
    path = copy(checkpoints, tmp_path)
    rewrite(path, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight"):
        JinaV4.from_pretrained(path, device="cpu")


def test_unexpected_tensor(checkpoints, tmp_path):
    path = copy(checkpoints, tmp_path)
    rewrite(path, lambda w: w.update({"lm_head.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected: model\.safetensors: tensor 'lm_head\.weight'"):
        JinaV4.from_pretrained(path, device="cpu")


def test_wrong_shape(checkpoints, tmp_path):
    path = copy(checkpoints, tmp_path)
    rewrite(path, lambda w: w.update({"visual.merger.mlp.2.bias": torch.zeros(5)}))
    with pytest.raises(CheckpointError, match=r"tensor 'visual\.merger\.mlp\.2\.bias' has shape \(5,\), expected"):
        JinaV4.from_pretrained(path, device="cpu")


def test_adapter_rank_differs_from_config(checkpoints, tmp_path):
    path = copy(checkpoints, tmp_path)
    cfg = json.loads((path / "adapters" / "adapter_config.json").read_text())
    cfg["r"] = 16
    (path / "adapters" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"adapters/adapter_model\.safetensors: tensor 'base_model\.model\..*"
        r"lora_A\..*has shape \(8, .*expected \(16, .*LoRA rank must equal r",
    ):
        JinaV4.from_pretrained(path, device="cpu")


def test_index_and_shard_disagree(checkpoints, tmp_path):
    path = copy(checkpoints, tmp_path, "gqa2-sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="disagrees with model.safetensors.index.json"):
        JinaV4.from_pretrained(path, device="cpu")


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda c: c["text_config"].pop("num_key_value_heads"),
            r"config\.json: key 'text_config\.num_key_value_heads' is missing",
        ),
        (
            lambda c: c["vision_config"].update(depth="4"),
            r"config\.json: key 'vision_config\.depth' should be int, got '4'",
        ),
        (lambda c: c.pop("task_names"), r"config\.json: key 'task_names' is missing"),
        (lambda c: c.update(matryoshka_dims=[8, "x"]), r"key 'matryoshka_dims\[1\]' should be int"),
    ],
)
def test_config_errors(checkpoints, tmp_path, edit, message):
    path = copy(checkpoints, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        JinaV4.from_pretrained(path, device="cpu")


def test_unknown_task_and_truncate_dim(models):
    m = models("gqa2-sharded")
    with pytest.raises(
        ValueError,
        match=r"unknown task 'search': valid tasks are "
        r"\['retrieval', 'text-matching', 'code'\]",
    ):
        m.encode_text("x", task="search")
    with pytest.raises(ValueError, match=r"no task given: pass task=\.\.\. or set model\.task to one of \['retrieval'"):
        m.encode_text("x")
    with pytest.raises(ValueError, match="unknown task"):
        m.task = "nope"
    with pytest.raises(ValueError, match=r"truncate_dim=100 is not one of the Matryoshka dims \[8, 16, 32, 64\]"):
        m.encode_text("x", task="code", truncate_dim=100)
    with pytest.raises(ValueError, match="prompt_name='question'"):
        m.encode_text("x", task="code", prompt_name="question")


def test_info_on_a_hub_id_fetches_only_the_configs(checkpoints, monkeypatch):
    import huggingface_hub

    from jina_v4.apps.cli import build_meta

    asked = {}

    def fake_snapshot_download(repo_id, allow_patterns, **kw):
        asked[repo_id] = allow_patterns
        return str(checkpoints["gqa2-sharded"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, _ = build_meta("tiny-org/tiny-v4")
    assert asked == {"tiny-org/tiny-v4": ["config.json", "adapters/adapter_config.json"]}
    assert model.model.norm.weight.is_meta


def test_a_tensor_in_two_shards(checkpoints, tmp_path):
    path = copy(checkpoints, tmp_path, "gqa2-sharded")
    first = load_file(path / "model-00001-of-00002.safetensors")
    key = next(iter(first))
    second = load_file(path / "model-00002-of-00002.safetensors")
    second[key] = first[key].clone()
    save_file(second, path / "model-00002-of-00002.safetensors")
    with pytest.raises(
        CheckpointError,
        match=rf"model-00002-of-00002\.safetensors: tensor '{key}' duplicates "
        rf"model-00001-of-00002\.safetensors: tensor '{key}'",
    ):
        JinaV4.from_pretrained(path, device="cpu")


def test_a_tensor_under_both_layouts(checkpoints, tmp_path):
    path = copy(checkpoints, tmp_path)
    rewrite(path, lambda w: w.update({"model.language_model.norm.weight": w["model.norm.weight"].clone()}))
    with pytest.raises(
        CheckpointError,
        match=r"tensor '(model\.language_model\.norm|model\.norm)\.weight' "
        r"duplicates model\.safetensors: tensor ",
    ):
        JinaV4.from_pretrained(path, device="cpu")


@pytest.mark.parametrize(
    "key, theirs, value",
    [
        ("patch_size", "patch_size", 16),
        ("merge_size", "spatial_merge_size", 3),
        ("temporal_patch_size", "temporal_patch_size", 1),
    ],
)
def test_preprocessor_and_vision_config_must_agree(checkpoints, tmp_path, key, theirs, value):
    """A preprocessor that cuts images into other pieces than the vision tower takes is refused at load, naming
    both files and both values (not an opaque reshape error at the first image)."""
    path = shutil.copytree(checkpoints["gqa2-sharded"], tmp_path / "ckpt")
    pre = json.loads((path / "preprocessor_config.json").read_text())
    ours = json.loads((path / "config.json").read_text())["vision_config"][theirs]
    pre[key] = value
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(ConfigError) as e:
        JinaV4.from_pretrained(path, device="cpu")
    message = str(e.value)
    assert f"preprocessor_config.json: key '{key}' is {value}" in message
    assert f"config.json has 'vision_config.{theirs}' {ours}" in message


def test_video_is_refused_by_name(models):
    from jina_v4.model.processing import Item

    model = models("gqa2-sharded")
    with pytest.raises(TypeError, match=r"inputs\[1\] is a video: jina-embeddings-v4 embeds texts and still images"):
        model.encode(["a text", {"video": "clip.mp4"}], task="code")
    item = model.prepare([{"image": torch.zeros(1)}], "code", errors="return")[0]  # not an image: an error in place
    assert isinstance(item, Exception)
    two_frames = Item([1, 2], "code", pixel_values=torch.zeros(8, 1176), grid=(2, 2, 2))
    with pytest.raises(ValueError, match="2 temporal patches: video is not supported"):
        model.processor.collate([two_frames])
