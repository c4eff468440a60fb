"""Bad inputs, bad files, devices and dtypes: each a clear error naming the input or file, or the reference's
result where the reference accepts the input."""

import io
import json
import re
import shutil
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from jina_v4 import CheckpointError, ConfigError, InputError, JinaV4

from tolerances import FP32


@pytest.fixture(scope="module")
def model(models):
    return models("gqa2-sharded")


# ---- texts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   \n\t ", "nul\x00byte\x00", "zero\u200bwidth"])
def test_texts_the_reference_accepts(model, references, rounding, text):
    ref = references("gqa2-sharded")
    for multivector in (False, True):
        run = lambda m: m.encode_text([text, "other"], task="code", return_multivector=multivector)[0]  # noqa
        got = run(model)
        expected = ref.encode_text([text], "code", multivector=multivector)[0]
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= FP32 * rounding("gqa2-sharded", run=run)  # tolerances.py


def test_non_str_items_and_non_lists(model):
    with pytest.raises(TypeError, match=r"texts\[1\] is NoneType, not str: None"):
        model.encode_text(["ok", None], task="code")
    with pytest.raises(TypeError, match=r"texts\[2\] is int, not str: 7"):
        model.encode_text(["a", "b", 7], task="code")
    with pytest.raises(TypeError, match=r"inputs must be a list, got \{'text': 'x'\}"):
        model.encode({"text": "x"}, task="code")


def test_empty_list(model):
    empty = model.encode_text([], task="code")
    assert isinstance(empty, torch.Tensor) and empty.shape == (0, model.config.text_config.hidden_size)
    assert model.encode_text([], task="code", return_multivector=True) == []
    assert model.encode_image([], task="code", return_numpy=True).shape == (0, 64)


def test_lone_surrogate(model):
    with pytest.raises(InputError, match=r"texts\[1\] \('bad \\ud800 text'\): not valid Unicode: a lone surrogate"):
        model.encode_text(["fine", "bad \ud800 text"], task="code")


def test_text_over_max_length_warns_and_truncates(model, references, rounding):
    ref = references("gqa2-sharded")
    tol = FP32 * rounding("gqa2-sharded", "text")  # tolerances.py
    # (20 + 2) x 20 characters (this vocabulary's longest token) is more than 20 tokens can cover: the longer text
    # is tokenized only that far, so its warning gives a lower bound; the shorter one's count is exact
    assert model.processor.token_chars == 20
    for text, at_least in (("a long text " * 30, False), ("a long text " * 40, True)):
        n = len(model.processor.tokenize([f"Query: {text}"], 10**6)[0].input_ids)
        with pytest.warns(UserWarning, match=r"texts\[0\] \('a long text .*\.\.\.\): .*tokens past max_length=20") as w:
            got = model.encode_text([text, "short"], task="code", max_length=20)
        message = str(w[0].message)
        count = int(re.search(r"(\d+) tokens past", message)[1])
        assert message.startswith("texts[0]") and ("at least" in message) == at_least
        assert count == n - 20 if not at_least else 1 <= count < n - 20
        assert (got[0] - ref.encode_text([text], "code", max_length=20)[0]).abs().max() <= tol


# ---- images --------------------------------------------------------------------------------------------


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def photo(h=90, w=120, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "bad, message",
    [
        (b"\x89PNG\r\n\x1a\n not really a png", r"images\[1\] \(b'\\x89PNG.*UnidentifiedImageError"),
        (png_bytes(photo())[:300], r"images\[1\] \(b'\\x89PNG.*(truncated|broken|OSError)"),
        (Image.new("RGB", (0, 7)), r"images\[1\] \(<PIL image RGB 0x7>\): ValueError: image has no pixels"),
        (b"just some text", r"images\[1\] \(b'just some text'\): UnidentifiedImageError"),
        (Image.new("RGB", (28 * 201, 28)), r"images\[1\] .*aspect ratio 201.0 is over 200"),
    ],
)
def test_bad_images_are_named(model, bad, message):
    with pytest.raises(InputError, match=message):
        model.encode_image([photo(), bad], task="code")


def test_decompression_bomb(model, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match=r"images\[0\] .*DecompressionBombError"):
        model.encode_image(png_bytes(photo(100, 100)), task="code")


def test_failing_url(model):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(InputError, match=rf"images\[0\] \('http://127.0.0.1:{port}/x.png'\): URLError"):
        model.encode_image(f"http://127.0.0.1:{port}/x.png", task="code")


def test_image_modes_the_reference_accepts(model, tmp_path):
    """16-bit, CMYK, palette with transparency, animated (first frame): as PIL's plain convert("RGB")."""
    base = photo(60, 80)
    gray16 = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    frames = [photo(60, 80, seed=s) for s in (1, 2, 3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with Image.open(tmp_path / "anim.gif") as gif:
        assert gif.n_frames == 3
        first = gif.convert("RGB")
    cases = [
        (gray16, gray16.convert("RGB")),
        (base.convert("CMYK"), base.convert("CMYK").convert("RGB")),
        (palette, palette.convert("RGB")),
        (tmp_path / "anim.gif", first),
    ]
    got = model.encode_image([x for x, _ in cases], task="code")
    expected = model.encode_image([y for _, y in cases], task="code")
    assert torch.equal(got, expected)


# ---- checkpoints ---------------------------------------------------------------------------------------


def copy(checkpoints, tmp_path, name="gqa2-sharded"):
    return shutil.copytree(checkpoints[name], tmp_path / name)


def test_truncated_shard(checkpoints, tmp_path):
    path = copy(checkpoints, tmp_path)
    shard = path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: not a readable safetensors file"):
        JinaV4.from_pretrained(path, device="cpu")


def test_corrupt_header(checkpoints, tmp_path):
    path = copy(checkpoints, tmp_path)
    shard = path / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:40] = b"#" * 32  # the JSON header
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors: not a readable safetensors file"):
        JinaV4.from_pretrained(path, device="cpu")


def test_adapter_targets_do_not_match(checkpoints, tmp_path):
    path = copy(checkpoints, tmp_path)
    cfg = json.loads((path / "adapters" / "adapter_config.json").read_text())
    cfg["target_modules"] = r".*(model).*(q_proj|k_proj|v_proj|o_proj)$|.*multi_vector_projector$"  # no MLP
    (path / "adapters" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"unexpected: adapters/adapter_model\.safetensors: tensor "
        r"'base_model\.model\.model\.language_model\.layers\.0\.mlp\.",
    ):
        JinaV4.from_pretrained(path, device="cpu")


def test_plain_qwen_checkpoint(checkpoints, tmp_path):
    path = copy(checkpoints, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    for key in ("task_names", "matryoshka_dims", "multi_vector_projector_dim", "auto_map"):
        cfg.pop(key)
    cfg["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConfigError,
        match=r"config\.json: a Qwen2_5_VLForConditionalGeneration checkpoint, not "
        r"jina-embeddings-v4 \(key 'task_names' is missing\)",
    ):
        JinaV4.from_pretrained(path, device="cpu")
    shutil.rmtree(path / "adapters")
    (path / "config.json").write_text(
        json.dumps({**cfg, **json.loads((checkpoints["gqa2-sharded"] / "config.json").read_text())})
    )
    with pytest.raises(ConfigError, match=r"adapters/adapter_config\.json: file not found"):
        JinaV4.from_pretrained(path, device="cpu")


# ---- devices and dtypes --------------------------------------------------------------------------------


def test_cuda_without_a_gpu(checkpoints):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="device='cuda': this torch build sees no CUDA device"):
        JinaV4.from_pretrained(checkpoints["gqa2-sharded"], device="cuda")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_on_cpu(checkpoints, model, dtype):
    half = JinaV4.from_pretrained(checkpoints["gqa2-sharded"], device="cpu", dtype=dtype)
    texts, image = ["a text to embed", "and another one"], photo(100, 150)
    for got, ref in [
        (half.encode_text(texts, task="code"), model.encode_text(texts, task="code")),
        (half.encode_image([image], task="code"), model.encode_image([image], task="code")),
    ]:
        assert got.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(got, ref).min() >= 0.99


def test_model_moved_between_dtypes_and_back(checkpoints, model):
    moved = JinaV4.from_pretrained(checkpoints["gqa2-sharded"], device="cpu")
    expected = model.encode_text(["moving"], task="code")
    moved.merge("code")
    moved.to(torch.bfloat16)
    assert moved.dtype == torch.bfloat16 and moved.model.layers[0].mlp.up_proj.merged_weight.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(moved.encode_text(["moving"], task="code"), expected) >= 0.99
    moved.merge(None)
    moved.to("cpu", torch.float32)  # back: fp32 arithmetic on the bf16-rounded weights
    assert moved.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(moved.encode_text(["moving"], task="code"), expected) >= 0.99
