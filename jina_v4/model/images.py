"""Image preprocessing, as the released fast processor (`Qwen2VLImageProcessorFast`) runs it on a CPU:
RGB -> smart_resize -> uint8 bicubic+antialias resize (bit-identical to the torchvision resize it calls) ->
(x - 255·mean) / (255·std) in fp32 -> (N, C·t·p·p) patches in the order the patch embedding expects.
"""

from __future__ import annotations

import io
import math
import os
import urllib.request
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from PIL import Image

from .config import PreprocessorConfig

ImageInput = Union[Image.Image, str, os.PathLike, bytes]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Both sides to multiples of `factor` (Python's round), area within [min_pixels, max_pixels], aspect kept.
    As transformers >= 4.57: a side that rounds to 0 leaves the area under min_pixels, so the scale-up branch
    sizes the image (4.52 raised an error for sides under `factor`)."""
    if min(height, width) < 1:
        raise ValueError(f"image has no pixels ({width}x{height})")
    if max(height, width) / min(height, width) > 200:
        aspect = max(height, width) / min(height, width)
        raise ValueError(f"image aspect ratio {aspect:.1f} is over 200 ({width}x{height})")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def load_image(image: ImageInput, timeout: float = 30.0) -> Image.Image:
    """A PIL image, a path, raw bytes or an http(s) URL -> an RGB PIL image. As the reference: a plain
    `convert("RGB")` (no EXIF rotation, transparency dropped rather than composited)."""
    if isinstance(image, Image.Image):
        img = image
    elif isinstance(image, (bytes, bytearray)):
        img = Image.open(io.BytesIO(image))
    elif isinstance(image, str) and image.startswith(("http://", "https://")):
        with urllib.request.urlopen(image, timeout=timeout) as response:
            img = Image.open(io.BytesIO(response.read()))
    elif isinstance(image, (str, os.PathLike)):
        img = Image.open(Path(image))
    else:
        raise TypeError(f"expected a PIL image, a path, bytes or a URL, got {type(image).__name__}")
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


def image_patches(
    img: Image.Image, cfg: PreprocessorConfig, max_pixels: int | None = None
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """RGB image -> pixel_values (t·h·w, C·t·p·p) fp32 and grid (t, h, w) in patches."""
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    h, w = smart_resize(img.height, img.width, p * m, cfg.min_pixels, max_pixels or cfg.max_pixels)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
    x = x.permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    # uint8 in, uint8 out: the CPU kernel rounds between its two passes, exactly as torchvision's resize.
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)[0]
    mean = torch.tensor(cfg.image_mean) * (1.0 / cfg.rescale_factor)
    std = torch.tensor(cfg.image_std) * (1.0 / cfg.rescale_factor)
    x = (x.float() - mean[:, None, None]) / std[:, None, None]  # (3, h, w)
    gh, gw = h // p, w // p
    x = x[None].expand(tp, -1, -1, -1)  # a still image is repeated to temporal_patch_size frames
    x = x.reshape(1, tp, 3, gh // m, m, p, gw // m, m, p)  # (t, tp, c, bh, mh, ph, bw, mw, pw)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, bh, bw, mh, mw, c, tp, ph, pw)
    return x.reshape(gh * gw, 3 * tp * p * p), (1, gh, gw)
