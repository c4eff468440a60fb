"""Stage files: the activations of one forward pass, stage by stage, for a fixed probe set, in one safetensors file
that any implementation can write (jina_v4 here, the transformers + peft reference in scripts/reference.py, a
port in its own code), and the comparison of two such files that names the first stage where they part.

A file holds, per probe case (a batch of inputs run in one forward), tensors under `<case>/<stage>`:

    input_ids (T,) int64          position_ids (3, T) int64       pixel_values (N, C) fp32     image_grid_thw (I, 3)
    visual.patch_embed (N, E)     visual.blocks.<i> (N, E)        visual.merger (U, D)
    embeddings (T, D)             decoder.layers.<i> (T, D)       decoder.norm (T, D)
    single (S, D) fp32            multi (T, P) fp32

T: the case's tokens, unpadded, its inputs' sequences concatenated in input order; N: image patches in the
processor's order (2x2 merge units row-major, as pixel_values arrive), never the tower's window order; U = N/4
merge units, row-major per image; S inputs. The probe images are stored too (`input/<case>/image.<i>`, uint8
H x W x 3), and the JSON header (metadata key "header") records the model, revision, dtype, device, the probe
inputs and the preprocessing settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

FORMAT = "jina_v4-stages/1"

# ---- the probe set ----------------------------------------------------------------------------------------------

TEXTS = [
    "Overview of climate change impacts on coastal cities",
    "Un beau coucher de soleil sur la plage",
    "海滩上美丽的日落",
    "浜辺に沈む美しい夕日",
    "تأثير تغير المناخ على المدن الساحلية",
    "Auswirkungen des Klimawandels auf Küstenstädte",
    "Влияние изменения климата на прибрежные города",
    "तटीय शहरों पर जलवायु परिवर्तन का प्रभाव",
]
CODE = [
    "def hello_world():\n    print('Hello, World!')",
    "fn fib(n: u64) -> u64 {\n    if n < 2 { n } else { fib(n - 1) + fib(n - 2) }\n}",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 3;",
]


@dataclass
class Case:
    """One batch of the probe set: inputs ({"text": str} or {"image": PIL image}) run in one forward pass."""

    name: str
    task: str
    prompt_name: str
    inputs: list[dict] = field(default_factory=list)


def document_image(height: int = 308, width: int = 224, seed: int = 0) -> Image.Image:
    """A page: white paper, a title bar, lines of dark 'text' strokes, a figure box (no font: the same pixels
    with every Pillow)."""
    rng = np.random.default_rng(seed)
    page = np.full((height, width, 3), 246, dtype=np.uint8)
    img = Image.fromarray(page)
    draw = ImageDraw.Draw(img)
    draw.rectangle([10, 8, width - 10, 26], fill=(30, 60, 120))
    y = 36
    while y < height - 12:
        x = 12
        while x < width - 20:
            n = int(rng.integers(6, 28))
            draw.rectangle([x, y, min(x + n, width - 12), y + 4], fill=(20, 20, 20))
            x += n + int(rng.integers(4, 9))
        y += 11
    draw.rectangle([width // 2, height // 2, width - 16, height // 2 + 50], fill=(200, 120, 40), outline=(0, 0, 0))
    return img


def thin_image(height: int = 30, width: int = 420, seed: int = 1) -> Image.Image:
    """A strip (a table row, a banner): a gradient with noise and bars."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :, None]
    base = np.concatenate([x * 200 + 30, (1 - x) * 180 + 40, np.full_like(x, 120)], -1)
    pixels = np.clip(base + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)
    pixels[:, ::37] = 0
    return Image.fromarray(pixels)


def probe_cases() -> list[Case]:
    """The probe set: texts in several scripts, code, a document-like page, a thin strip, a mixed batch."""
    return [
        Case("text", "retrieval", "query", [{"text": t} for t in TEXTS]),
        Case("code", "code", "passage", [{"text": t} for t in CODE]),
        Case("document", "retrieval", "passage", [{"image": document_image()}]),
        Case("thin", "retrieval", "passage", [{"image": thin_image()}]),
        Case(
            "mixed",
            "text-matching",
            "query",
            [{"text": TEXTS[0]}, {"image": document_image(120, 150, seed=2)}, {"text": CODE[0]}],
        ),
    ]


# ---- stage names and their order --------------------------------------------------------------------------------

INTEGER_STAGES = ("input_ids", "position_ids", "image_grid_thw")
PREPROCESSING = ("input_ids", "position_ids", "pixel_values", "image_grid_thw")
HEADS = ("single", "multi")


def stage_rank(stage: str) -> tuple:
    """Forward order: preprocessing, vision (patch embedding, blocks, merger), embeddings, decoder layers, norm,
    heads. Unknown stages (a port's extras) sort last, by name."""
    m = re.fullmatch(r"(visual\.blocks|decoder\.layers)\.(\d+)", stage)
    if m:
        return (2 if m.group(1) == "visual.blocks" else 5, int(m.group(2)), "")
    fixed = {"visual.patch_embed": 1, "visual.merger": 3, "embeddings": 4, "decoder.norm": 6}
    if stage in PREPROCESSING:
        return (0, PREPROCESSING.index(stage), "")
    if stage in fixed:
        return (fixed[stage], 0, "")
    if stage in HEADS:
        return (7, HEADS.index(stage), "")
    return (8, 0, stage)


def windows_to_rows(x: torch.Tensor, index: torch.Tensor, unit: int) -> torch.Tensor:
    """(N, E) patches in a vision tower's window order -> the processor's order. `index`: (U,) the merge units in
    window order (window k holds unit index[k]), as jina_v4's VisionLayout.index and the reference's
    get_window_index give it."""
    out = torch.empty_like(x).view(len(index), unit, -1)
    out[index.to(x.device)] = x.view(len(index), unit, -1)
    return out.view_as(x)


# ---- recording jina_v4 --------------------------------------------------------------------------------------------


def revision(path: Path) -> str:
    """The hub snapshot's commit for a downloaded checkpoint; a local directory: its name and config digest."""
    path = Path(path).resolve()
    if path.parent.name == "snapshots":
        return path.name
    digest = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:12] if path.is_dir() else "?"
    return f"local {path.name} (config.json sha256 {digest})"


def preprocessing_settings(model) -> dict:
    from ..model.processing import IMAGE_PROMPT

    cfg = model.processor.image_cfg
    return {
        "min_pixels": cfg.min_pixels,
        "max_pixels": cfg.max_pixels,
        "patch_size": cfg.patch_size,
        "merge_size": cfg.merge_size,
        "temporal_patch_size": cfg.temporal_patch_size,
        "image_mean": list(cfg.image_mean),
        "image_std": list(cfg.image_std),
        "resize": "RGB, smart_resize to multiples of 28, bicubic with antialias on uint8 (torchvision's)",
        "image_prompt": IMAGE_PROMPT,
        "prompts": {t.name: {"query": t.query, "passage": t.passage} for t in model.tasks.values()},
        "tokenizer": "tokenizer.json, no special tokens added, no truncation below 32768",
    }


def header(model_name: str, path, dtype, device, cases: list[Case], implementation: str, settings: dict) -> dict:
    return {
        "format": FORMAT,
        "implementation": implementation,
        "model": str(model_name),
        "revision": revision(path) if path is not None else "",
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "torch": torch.__version__,
        "cases": [
            {
                "name": c.name,
                "task": c.task,
                "prompt_name": c.prompt_name,
                "inputs": [
                    {"text": x["text"]} if "text" in x else {"image": f"input/{c.name}/image.{i}"}
                    for i, x in enumerate(c.inputs)
                ],
            }
            for c in cases
        ],
        "preprocessing": settings,
        "layout": "hidden states: unpadded tokens of the case's inputs in input order; vision: processor patch order",
    }


def image_tensors(cases: list[Case]) -> dict[str, torch.Tensor]:
    return {
        f"input/{c.name}/image.{i}": torch.from_numpy(np.array(x["image"].convert("RGB")))
        for c in cases
        for i, x in enumerate(c.inputs)
        if "image" in x
    }


@torch.inference_mode()
def record(model, cases: list[Case] | None = None) -> dict[str, torch.Tensor]:
    """jina_v4's stages for each case: hooks on the model's own modules during one forward per case."""
    from ..model.heads import multi_vectors, single_vectors

    cases = probe_cases() if cases is None else cases
    out: dict[str, torch.Tensor] = {}
    for case in cases:
        items = model.prepare(case.inputs, case.task, case.prompt_name, name=case.name)
        batch = model.processor.collate(items).to(model.device, model.dtype)
        got: dict[str, torch.Tensor] = {}
        unit = model.config.vision_config.spatial_merge_size**2

        def keep(name, rows=None):
            def hook(module, args, output):
                x = output if rows is None else windows_to_rows(output, rows, unit)
                got[name] = x.detach()

            return hook

        hooks = [model.model.register_forward_pre_hook(lambda m, args: got.__setitem__("embeddings", args[0]))]
        hooks += [
            layer.register_forward_hook(keep(f"decoder.layers.{i}")) for i, layer in enumerate(model.model.layers)
        ]
        hooks.append(model.model.norm.register_forward_hook(keep("decoder.norm")))
        if batch.vision is not None:
            hooks.append(model.visual.patch_embed.register_forward_hook(keep("visual.patch_embed")))
            blocks = model.visual.blocks
            hooks += [
                b.register_forward_hook(keep(f"visual.blocks.{i}", batch.vision.index)) for i, b in enumerate(blocks)
            ]
            hooks.append(model.visual.register_forward_hook(keep("visual.merger")))
        try:
            h = model(batch)
        finally:
            for hook in hooks:
                hook.remove()
        got["input_ids"], got["position_ids"] = batch.input_ids, batch.position_ids
        if batch.pixel_values is not None:
            got["pixel_values"] = batch.pixel_values.float()
            got["image_grid_thw"] = torch.tensor([it.grid for it in items if it.grid is not None])
        got["single"] = single_vectors(model, h, batch)
        got["multi"] = torch.cat(list(multi_vectors(model, h, batch)))
        out.update({f"{case.name}/{k}": v.cpu().contiguous() for k, v in got.items()})
    return out


def record_model(model, model_name: str, path, cases: list[Case] | None = None) -> tuple[dict, dict]:
    """(tensors, header) of jina_v4's stage file for `model` (loaded from `path`)."""
    cases = probe_cases() if cases is None else cases
    tensors = {**record(model, cases), **image_tensors(cases)}
    settings = preprocessing_settings(model)
    meta = header(model_name, path, model.dtype, model.device, cases, "jina_v4 (jina_v4/apps/stages.py)", settings)
    return tensors, meta


# ---- files ------------------------------------------------------------------------------------------------------


def save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    from .common import atomic_write

    stages = sorted({k.split("/", 1)[1] for k in tensors if not k.startswith("input/")}, key=stage_rank)
    meta = {**meta, "stages": stages}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"header": json.dumps(meta)}))


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if "header" not in meta:
        raise ValueError(f"{path}: no 'header' metadata: not a stage file ({FORMAT})")
    head = json.loads(meta["header"])
    if head.get("format") != FORMAT:
        raise ValueError(f"{path}: format {head.get('format')!r}, expected {FORMAT!r}")
    return tensors, head


def cases_from(tensors: dict[str, torch.Tensor], meta: dict) -> list[Case]:
    """The probe inputs a stage file was recorded on (its texts, and its images from their uint8 tensors)."""
    cases = []
    for c in meta["cases"]:
        inputs = [
            {"text": x["text"]} if "text" in x else {"image": Image.fromarray(tensors[x["image"]].numpy())}
            for x in c["inputs"]
        ]
        cases.append(Case(c["name"], c["task"], c["prompt_name"], inputs))
    return cases


# ---- comparison ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    rel: float  # ||a - b|| / ||b|| over the stage's whole tensor
    token_cos: float  # every token's (row's) cosine at least this
    why: str


# A stage passes when its relative difference is at most `rel` and its worst token's cosine at least `token_cos`.
# The pair of files is judged by the coarser of their dtypes. Integer stages must be equal; pixel_values are
# fp32 whatever the model's dtype: at most 1e-5 apart anywhere (one uint8 level of a resize is >= 0.0145).
# The reasons, and what the tiny checkpoints measure against them, are in NOTES.md ("Stage files").
TOLERANCES = {
    "float64": Tolerance(1e-9, 1 - 1e-12, "float64 rounding (1.1e-16) amplified by the layers: a million-fold margin"),
    "float32": Tolerance(
        1e-4,
        0.99999,
        "fp32 rounding (6e-8) amplified through the layers, and kernels that sum in another order (per-window "
        "vision attention): the tiny checkpoints reach 1.4e-6; a wrong index, mask or weight gives 1e-3 and more",
    ),
    "float16": Tolerance(
        5e-2, 0.99, "fp16 storage (unit roundoff 4.9e-4) of every intermediate, accumulated over the layers"
    ),
    "bfloat16": Tolerance(
        1e-1,
        0.95,
        "bf16 storage (unit roundoff 3.9e-3, 8x fp16's) of every intermediate, accumulated over the layers: the "
        "tiny checkpoints reach rel 4e-2 and a worst token of 0.989 against fp32; 0.95 is parity.py's multi gate",
    ),
}
PIXEL_MAX_ABS = 1e-5
COARSENESS = ["float64", "float32", "float16", "bfloat16"]


def coarser(a: str, b: str) -> str:
    return max(a, b, key=COARSENESS.index)


@dataclass
class Row:
    stage: str
    case: str
    ok: bool
    note: str = ""  # integer stages: "equal" / "N of M differ"; shape mismatch
    max_abs: float = 0.0
    rel: float = 0.0
    cos: float = 1.0
    token_mean: float | None = None
    token_min: float | None = None
    token_worst: int | None = None


def compare_tensors(stage: str, case: str, a: torch.Tensor, b: torch.Tensor, tol: Tolerance) -> Row:
    """One (case, stage): a (the implementation under test) against b (the reference side)."""
    if a.shape != b.shape:
        return Row(stage, case, False, f"shape {tuple(a.shape)} vs {tuple(b.shape)}")
    if stage in INTEGER_STAGES or not (a.is_floating_point() and b.is_floating_point()):
        bad = int((a != b).sum())
        return Row(stage, case, bad == 0, "equal" if bad == 0 else f"{bad} of {a.numel()} differ")
    x, y = a.double(), b.double()
    diff = x - y
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    norm = float(y.norm())
    rel = float(diff.norm()) / norm if norm > 0 else (0.0 if max_abs == 0 else math.inf)
    cos = float(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0)) if x.numel() else 1.0
    row = Row(stage, case, True, "", max_abs, rel, cos)
    if x.dim() == 2 and len(x):
        tok = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-30)
        both_zero = (x.abs().sum(-1) == 0) & (y.abs().sum(-1) == 0)
        tok = torch.where(both_zero, torch.ones_like(tok), tok)
        row.token_mean, row.token_min, row.token_worst = float(tok.mean()), float(tok.min()), int(tok.argmin())
    if stage == "pixel_values":
        row.ok = max_abs <= PIXEL_MAX_ABS
    else:
        row.ok = rel <= tol.rel and (row.token_min is None or row.token_min >= tol.token_cos)
    return row


@dataclass
class Report:
    dtype: str
    tolerance: Tolerance
    rows: list[Row]
    only_a: list[str]
    only_b: list[str]

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if not r.ok]

    @property
    def first_failure(self) -> Row | None:
        """The earliest stage in forward order where any case is out of tolerance."""
        bad = self.failed
        return min(bad, key=lambda r: stage_rank(r.stage)) if bad else None

    @property
    def ok(self) -> bool:
        return not self.failed

    def stage(self, stage: str) -> list[Row]:
        return [r for r in self.rows if r.stage == stage]


def compare(
    a: dict[str, torch.Tensor], meta_a: dict, b: dict[str, torch.Tensor], meta_b: dict, dtype: str | None = None
) -> Report:
    """Every (case, stage) of A against B, under the tolerance of `dtype` (default: the coarser of the two files'
    dtypes). Stages in one file only are listed, not judged (a port may record fewer)."""
    dtype = dtype or coarser(meta_a["dtype"], meta_b["dtype"])
    if dtype not in TOLERANCES:
        raise ValueError(f"dtype {dtype!r}: no stage tolerance (one of {list(TOLERANCES)})")
    tol = TOLERANCES[dtype]
    keys_a = {k for k in a if not k.startswith("input/")}
    keys_b = {k for k in b if not k.startswith("input/")}
    rows = []
    for k in sorted(keys_a & keys_b, key=lambda k: (stage_rank(k.split("/", 1)[1]), k)):
        case, stage = k.split("/", 1)
        rows.append(compare_tensors(stage, case, a[k], b[k], tol))
    return Report(dtype, tol, rows, sorted(keys_a - keys_b), sorted(keys_b - keys_a))


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def format_report(report: Report, name_a: str = "A", name_b: str = "B") -> str:
    """One line per stage: the worst case's figures (the largest relative difference, the lowest token cosine),
    then the verdict naming the first stage out of tolerance."""
    t = report.tolerance
    lines = [
        f"{name_a} against {name_b}; tolerance {report.dtype}: rel <= {t.rel:g}, every token cosine >= {t.token_cos}, "
        f"pixel_values max abs <= {PIXEL_MAX_ABS:g}, integer stages equal",
        f"{'stage':<22} {'worst case':<10} {'max abs':>9} {'rel':>9} {'cosine':>10} {'token mean':>10} "
        f"{'worst tok':>10} {'at token':>12}  result",
    ]
    for stage in sorted({r.stage for r in report.rows}, key=stage_rank):
        rows = report.stage(stage)
        worst = max(rows, key=lambda r: (not r.ok, r.rel, -(r.token_min if r.token_min is not None else 1)))
        tok = [r for r in rows if r.token_min is not None]
        mean = sum(r.token_mean for r in tok) / len(tok) if tok else None
        low = min(tok, key=lambda r: r.token_min) if tok else None
        verdict = "pass" if all(r.ok for r in rows) else "FAIL"
        if worst.note:
            lines.append(f"{stage:<22} {worst.case:<10} {worst.note:>63}  {verdict}")
            continue
        lines.append(
            f"{stage:<22} {worst.case:<10} {worst.max_abs:>9.2e} {worst.rel:>9.2e} {worst.cos:>10.7f} "
            f"{_fmt(mean, '>10.7f'):>10} {_fmt(low and low.token_min, '>10.7f'):>10} "
            f"{(low.case + ':' + str(low.token_worst)) if low else '':>12}  {verdict}"
        )
    for label, keys in (("only in " + name_a, report.only_a), ("only in " + name_b, report.only_b)):
        if keys:
            lines.append(f"{label} (not compared): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
    floats = [r for r in report.rows if not r.note and r.stage not in PREPROCESSING]
    if floats:
        w = max(floats, key=lambda r: (r.rel, r.stage))
        tok = [r for r in floats if r.token_min is not None]
        low = min(tok, key=lambda r: r.token_min) if tok else None
        lines.append(
            f"largest difference: {w.stage} ({w.case}), rel {w.rel:.2e}"
            + (
                f"; worst token cosine {low.token_min:.6f} (1 - {1 - low.token_min:.1e}) at {low.stage} "
                f"({low.case}, token {low.token_worst})"
                if low
                else ""
            )
        )
    first = report.first_failure
    if first is None:
        lines.append(f"all {len(report.rows)} stage tensors within the {report.dtype} tolerance")
    else:
        what = first.note or f"rel {first.rel:.2e}, worst token cosine {_fmt(first.token_min, '.6f') or '-'}"
        lines.append(
            f"FIRST STAGE OUT OF TOLERANCE: {first.stage} (case {first.case}: {what}); "
            f"{len(report.failed)} of {len(report.rows)} stage tensors fail"
        )
    return "\n".join(lines)


def summary(report: Report) -> dict[str, Any]:
    """The report as JSON-ready data."""
    return {
        "dtype": report.dtype,
        "ok": report.ok,
        "first_failure": None if report.first_failure is None else report.first_failure.stage,
        "rows": [r.__dict__ for r in report.rows],
    }
