"""The image path: preprocessing against the released processor, index functions against transformers, and
fp32 parity of image and mixed text+image embeddings against the reference run one input at a time."""

import http.server
import io
import json
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_5_vl import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

from jina_v4.model.config import PreprocessorConfig
from jina_v4.model.images import image_patches, load_image, smart_resize
from jina_v4.model.positions import VisionLayout, rope_index, vision_cos_sin, window_index

from synthetic import RELEASED
from tolerances import FP32

pytestmark = pytest.mark.parity

TASKS = ["retrieval", "text-matching", "code"]
IMAGE_CFG = PreprocessorConfig.from_dict(json.loads((RELEASED / "preprocessor_config.json").read_text()))
# (height, width): merged grids that fill whole 4x4 windows and ones that leave partial windows
SIZES = [(224, 224), (240, 320), (100, 500), (300, 90), (56, 56), (450, 380), (20, 300)]


def picture(h, w, seed=0, mode="RGB", noise=3.0):
    """A smooth gradient with some noise, deterministic. noise=3 is photo-like; 12 is harsh on resamplers."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(h + w - 2, 1)], -1)
    rgb = np.clip(rgb + rng.normal(0, noise, rgb.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(rgb)
    if mode == "P":  # an adaptive palette: the web palette's dithering would turn it into noise
        return img.convert("P", palette=Image.Palette.ADAPTIVE)
    return img if mode == "RGB" else img.convert(mode)


# ---- preprocessing -------------------------------------------------------------------------------------


def test_smart_resize_matches_transformers_5():
    """963 sizes (sides of 1-14 px, aspect ratios near 200, three area bounds) against a table that
    transformers 5.x's own smart_resize produced (tests/data/smart_resize_transformers5.json records the
    version). A side that rounds to 0 px falls into the scale-up branch there (13x100 -> 28x168)."""
    table = json.loads((Path(__file__).parent / "data" / "smart_resize_transformers5.json").read_text())
    assert table["source"].startswith("transformers 5.")
    for h, w, min_pixels, max_pixels, expected in table["cases"]:
        if expected == "error":
            with pytest.raises(ValueError, match="aspect ratio"):
                smart_resize(h, w, 28, min_pixels, max_pixels)
        else:
            assert list(smart_resize(h, w, 28, min_pixels, max_pixels)) == expected, (h, w, min_pixels, max_pixels)


@pytest.mark.parametrize("h, w", [(29, 29), (28, 5600), (1000, 1000), (1600, 2400), (3000, 4000), (77, 28)])
def test_smart_resize_matches_transformers_4_52(h, w):
    """The pinned reference agrees wherever it accepts the size (it raises for sides under 28 px)."""
    for max_pixels in (IMAGE_CFG.max_pixels, 1_003_520):
        assert smart_resize(h, w, 28, IMAGE_CFG.min_pixels, max_pixels) == hf_smart_resize(
            h, w, 28, IMAGE_CFG.min_pixels, max_pixels
        )


def test_released_token_counts():
    """Sequence lengths the real model produced for these sizes (measured on the released model by the
    jina-embeddings-v4 vLLM plugin's validation: 75, 110, 1258 tokens)."""
    for (h, w), max_pixels, rows in [
        ((224, 224), None, 75),
        ((240, 320), None, 110),
        ((1600, 2400), 1_003_520, 1258),
        ((1600, 2400), None, 737),
    ]:
        rh, rw = smart_resize(h, w, 28, IMAGE_CFG.min_pixels, max_pixels or IMAGE_CFG.max_pixels)
        assert rh * rw // 28**2 + 11 == rows


def reference_resize_path(img, max_pixels=None):
    """The released fast processor on CPU, step by step: PIL -> uint8 CHW -> torchvision's
    uint8 bicubic+antialias, which is `interpolate` on uint8 -> fused normalisation -> patch flattening."""
    rh, rw = hf_smart_resize(img.height, img.width, 28, IMAGE_CFG.min_pixels, max_pixels or IMAGE_CFG.max_pixels)
    x = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
    return torch.nn.functional.interpolate(x[None], size=(rh, rw), mode="bicubic", align_corners=False, antialias=True)[
        0
    ]


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16"])
@pytest.mark.parametrize("h, w", [(224, 224), (31, 517), (480, 640), (1001, 999), (2000, 1500)])
def test_pixel_values_against_released_processor(h, w, mode):
    img = picture(h, w, seed=h + w, mode=mode)
    pixels, grid = image_patches(load_image(img), IMAGE_CFG)
    slow = Qwen2VLImageProcessor(
        **{
            k: v
            for k, v in json.loads((RELEASED / "preprocessor_config.json").read_text()).items()
            if k != "processor_class"
        }
    )
    expected = slow(images=[img], return_tensors="pt")
    assert grid == tuple(expected["image_grid_thw"][0].tolist())
    # 1) the resize is exactly the interpolate path; the patch order and normalisation are the processor's:
    #    the PIL processor fed our resized uint8 image (no resize of its own) gives the same pixel_values.
    resized = reference_resize_path(img)
    same = slow(images=[resized.permute(1, 2, 0).numpy()], do_resize=False, return_tensors="pt")
    # fused (x - 255·mean) / (255·std) against three steps: at most five fp32 roundings, each within half an ulp
    assert (pixels - same["pixel_values"]).abs().max() <= 5 * torch.finfo(torch.float32).eps * pixels.abs().max()
    ours_u8 = torch.nn.functional.interpolate(
        torch.from_numpy(np.array(load_image(img))).permute(2, 0, 1)[None],
        size=resized.shape[1:],
        mode="bicubic",
        align_corners=False,
        antialias=True,
    )[0]
    assert torch.equal(ours_u8, resized)
    # 2) against the whole PIL processor (Pillow's own bicubic): within 2 grey levels on photo-like images
    #    (strong white noise, noise=12, reaches 4-5 levels at near-unity scales: see NOTES.md).
    std = torch.tensor(IMAGE_CFG.image_std).repeat_interleave(2 * 14 * 14) * 255
    assert ((pixels - expected["pixel_values"]).abs() * std).max() <= 2 + 1e-3


def test_pixel_values_equal_torchvision_fast_processor():
    """Exact (torch.equal) against the released fast processor, where torchvision is installed."""
    pytest.importorskip("torchvision")
    from transformers.models.qwen2_vl.image_processing_qwen2_vl_fast import Qwen2VLImageProcessorFast

    fast = Qwen2VLImageProcessorFast(
        **{
            k: v
            for k, v in json.loads((RELEASED / "preprocessor_config.json").read_text()).items()
            if k != "processor_class"
        }
    )
    for i, (h, w) in enumerate([(224, 224), (31, 517), (480, 640), (1001, 999), (2000, 1500), (240, 320)]):
        for mode in ("RGB", "P", "RGBA", "CMYK", "I;16"):
            img = picture(h, w, seed=i, mode=mode)
            expected = fast(images=[img], return_tensors="pt")
            pixels, grid = image_patches(load_image(img), IMAGE_CFG)
            assert torch.equal(pixels, expected["pixel_values"]), (h, w, mode)
            assert grid == tuple(expected["image_grid_thw"][0].tolist())


def test_exif_orientation_is_not_applied(tmp_path):
    """As the reference: Image.open(...).convert("RGB") never transposes, so a JPEG tagged Orientation = 6 keeps
    its stored (landscape) pixels, as bytes and as a path."""
    img = picture(120, 200, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    stored = Image.open(path).convert("RGB")
    assert stored.size == (200, 120) and Image.open(path).getexif()[0x0112] == 6
    slow = Qwen2VLImageProcessor(
        **{
            k: v
            for k, v in json.loads((RELEASED / "preprocessor_config.json").read_text()).items()
            if k != "processor_class"
        }
    )
    expected_grid = tuple(slow(images=[stored], return_tensors="pt")["image_grid_thw"][0].tolist())
    resized = reference_resize_path(stored)
    for source in (path, path.read_bytes()):
        pixels, grid = image_patches(load_image(source), IMAGE_CFG)
        assert grid == expected_grid == (1, 8, 14)  # landscape: not the 14 x 8 of the displayed image
        ours_u8 = torch.nn.functional.interpolate(
            torch.from_numpy(np.array(load_image(source))).permute(2, 0, 1)[None],
            size=resized.shape[1:],
            mode="bicubic",
            antialias=True,
        )[0]
        assert torch.equal(ours_u8, resized)


def test_transparency_is_dropped_not_composited():
    """The released reference (transformers 4.52) converts RGBA with a plain convert("RGB"): the colour under a
    transparent pixel stays. (transformers 5.x composites onto white instead.)"""
    rgb = np.asarray(picture(64, 96, seed=4))
    alpha = np.tile(np.linspace(0, 255, 96).astype(np.uint8), (64, 1))  # transparent left, opaque right
    img = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    pixels, _ = image_patches(load_image(img), IMAGE_CFG)
    plain, _ = image_patches(Image.fromarray(rgb), IMAGE_CFG)
    assert torch.equal(pixels, plain)
    white = Image.new("RGB", img.size, (255, 255, 255))
    white.paste(img, mask=img.split()[3])
    composited, _ = image_patches(white, IMAGE_CFG)
    assert (pixels - composited).abs().max() > 1  # the two conventions really differ on this image


def test_image_sources(tmp_path):
    img = picture(60, 90)
    path = tmp_path / "x.png"
    img.save(path)
    buf = io.BytesIO()
    img.save(buf, format="PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(buf.getvalue())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/x.png"
        loaded = [load_image(x) for x in (img, path, str(path), buf.getvalue(), url)]
    finally:
        server.shutdown()
    for x in loaded:
        assert x.mode == "RGB" and np.array_equal(np.array(x), np.array(img))


# ---- index functions -----------------------------------------------------------------------------------

GRIDS = [(1, 16, 16), (1, 18, 22), (1, 8, 36), (1, 22, 6), (1, 4, 4), (1, 2, 2), (1, 32, 28), (2, 6, 10)]


def hf_vision(cfg_dict):
    v = Qwen2_5_VLConfig.from_dict(cfg_dict).vision_config
    return types.SimpleNamespace(
        spatial_merge_size=v.spatial_merge_size,
        patch_size=v.patch_size,
        window_size=v.window_size,
        spatial_merge_unit=v.spatial_merge_size**2,
        rotary_pos_emb=hf.Qwen2_5_VisionRotaryEmbedding(v.hidden_size // v.num_heads // 2),
    )


def test_window_index_and_seqlens(checkpoints):
    ref = hf_vision(json.loads((checkpoints["gqa2-sharded"] / "config.json").read_text()))
    for grids in [[g] for g in GRIDS] + [GRIDS[:4], GRIDS[3:]]:
        thw = torch.tensor(grids)
        index, cu_window = hf.Qwen2_5_VisionTransformerPretrainedModel.get_window_index(ref, thw)
        cu_window = torch.unique_consecutive(torch.tensor(cu_window)).tolist()
        cu_full = torch.nn.functional.pad(torch.repeat_interleave(thw[:, 1] * thw[:, 2], thw[:, 0]).cumsum(0), (1, 0))
        layout = VisionLayout(grids, 4, 2)
        assert torch.equal(layout.index, index)
        assert layout.windows.cu == cu_window and layout.images.cu == cu_full.tolist()
        assert torch.equal(torch.sort(layout.index).values, torch.arange(len(layout.index)))  # a permutation
    # 16x16 patches -> four 4x4-unit windows
    assert window_index((1, 16, 16), 4, 2)[0][:8].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]


def test_vision_rotary(checkpoints):
    cfg = json.loads((checkpoints["gqa4-single"] / "config.json").read_text())
    ref = hf_vision(cfg)
    head_dim = cfg["vision_config"]["hidden_size"] // cfg["vision_config"]["num_heads"]
    for grids in [[g] for g in GRIDS] + [GRIDS]:
        theta = hf.Qwen2_5_VisionTransformerPretrainedModel.rot_pos_emb(ref, torch.tensor(grids))
        emb = torch.cat((theta, theta), dim=-1)
        cos, sin = vision_cos_sin(VisionLayout(grids, 4, 2).positions, head_dim, torch.float32)
        assert torch.equal(cos, emb.cos()) and torch.equal(sin, emb.sin())


def test_rope_index_with_images_and_padding(checkpoints):
    cfg = json.loads((checkpoints["gqa2-sharded"] / "config.json").read_text())
    model = types.SimpleNamespace(config=Qwen2_5_VLConfig.from_dict(cfg))
    pad, start, end = cfg["image_token_id"], cfg["vision_start_token_id"], cfg["vision_end_token_id"]
    rows = [
        ([5, 6, 7, start] + [pad] * 6 + [end, 1, 2, 3, 4, 5, 6], [(1, 4, 6)]),  # the worked example in NOTES
        ([1, 2, 3], []),  # text only, padded
        ([start] + [pad] * 20 + [end] + [4] * 30, [(1, 10, 8)]),
        ([9, start] + [pad] * 4 + [end, 3, start] + [pad] * 6 + [end], [(1, 4, 4), (1, 4, 6)]),
    ]
    L = max(len(r) for r, _ in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for b, (r, _) in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
    grids = torch.tensor([g for _, gs in rows for g in gs])
    expected, _ = hf.Qwen2_5_VLModel.get_rope_index(model, ids, grids, None, None, mask)
    for b, (r, gs) in enumerate(rows):
        assert torch.equal(rope_index(r, gs, pad, 2), expected[:, b, : len(r)])
    assert rope_index(rows[0][0], rows[0][1], pad, 2).tolist() == [
        [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9, 10, 11, 12, 13],
        [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9, 10, 11, 12, 13],
        [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
    ]


# ---- parity --------------------------------------------------------------------------------------------


def reference_image(ref, model, img, task, **kw):
    pixels, grid = image_patches(load_image(img), IMAGE_CFG, kw.pop("max_pixels", None))
    return ref.encode_image(pixels, grid, task, **kw)


@pytest.mark.parametrize("task", TASKS)
def test_image_parity(name, models, references, rounding, task):
    """FP32 x E: E the checkpoint's emulated fp32 error (tolerances.py)."""
    model, ref = models(name), references(name)
    imgs = [picture(h, w, seed=i, noise=12) for i, (h, w) in enumerate(SIZES)]
    single = model.encode_image(imgs, task=task, batch_size=4)
    multi = model.encode_image(imgs, task=task, batch_size=3, return_multivector=True)
    for img, s, m in zip(imgs, single, multi):
        assert (s - reference_image(ref, model, img, task)[0]).abs().max() <= FP32 * rounding(name, "image")
        expected = reference_image(ref, model, img, task, multivector=True)[0]
        assert m.shape == expected.shape
        assert (m - expected).abs().max() <= FP32 * rounding(name, "image-multi")


def test_image_ids_match_reference(models, references):
    model, ref = models("gqa2-sharded"), references("gqa2-sharded")
    for h, w in SIZES:
        item = model.processor.image_item(picture(h, w), "code")
        assert item.input_ids == ref.image_batch(item.grid)["input_ids"][0].tolist()


def test_truncate_dim_and_max_pixels(models, references, rounding):
    model, ref = models("gqa4-single"), references("gqa4-single")
    img = picture(600, 800)
    for dim in (8, 32):
        run = lambda m: m.encode_image(img, task="code", truncate_dim=dim, max_pixels=100_000)  # noqa: E731
        got = run(model)
        expected = reference_image(ref, model, img, "code", truncate_dim=dim, max_pixels=100_000)[0]
        assert got.shape == (dim,)
        assert (got - expected).abs().max() <= FP32 * rounding("gqa4-single", "image", run=run)
    rows = model.encode_image(img, task="code", return_multivector=True, max_pixels=100_000).shape[0]
    h, w = smart_resize(600, 800, 28, 3136, 100_000)
    assert rows == h * w // 28**2 + len(model.processor.image_prompt) - 1


def test_mixed_text_and_image_batch(name, models, references, rounding):
    """Each row pooled by its own rule, in one packed batch (the reference pools by row 0's rule)."""
    model, ref = models(name), references(name)
    inputs = [
        "a query about maps",
        picture(240, 320, 1),
        {"text": "a passage " * 20},
        picture(100, 500, 2),
        {"image": picture(56, 56, 3)},
        "short",
    ]
    tasks = ["retrieval", "code", "text-matching", "retrieval", "code", "code"]
    for multivector in (False, True):
        got = model.encode(inputs, task=tasks, prompt_name="passage", batch_size=6, return_multivector=multivector)
        for x, task, g in zip(inputs, tasks, got):
            x = x.get("text", x.get("image")) if isinstance(x, dict) else x
            if isinstance(x, str):
                expected = ref.encode_text([x], task, "passage", multivector=multivector)[0]
            else:
                expected = reference_image(ref, model, x, task, multivector=multivector)[0]
            kinds = ("text-multi", "image-multi") if multivector else ("text", "image")
            assert g.shape == expected.shape and (g - expected).abs().max() <= FP32 * rounding(name, *kinds)


def test_image_errors(models):
    model = models("gqa2-sharded")
    with pytest.raises(ValueError, match=r"images\[1\] .*aspect ratio"):
        model.encode_image([picture(30, 40), picture(28, 28 * 201)], task="code")
    with pytest.raises(ValueError, match=r"images\[0\] \('/no/such\.png'\): FileNotFoundError"):
        model.encode_image("/no/such.png", task="code")
    with pytest.raises(TypeError, match=r"inputs\[1\] is neither text nor an image: 3"):
        model.encode(["x", 3], task="code")
