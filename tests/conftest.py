import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))  # reference.py, the oracle (also used by parity.py)

from synthetic import CONFIGS, write_checkpoint, write_demo_checkpoint  # noqa: E402

torch.set_num_threads(max(1, min(4, torch.get_num_threads())))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> directory of a tiny checkpoint in the released layout, written once per session by jina_v4's own
    writer (synthetic.write_demo_checkpoint: no transformers or peft). tests/test_synthetic.py proves its files
    equal, byte for byte, those the reference's modules write (`reference_checkpoints`)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {t.name: write_demo_checkpoint(root / t.name, t, seed=i) for i, t in enumerate(CONFIGS)}


@pytest.fixture(scope="session")
def reference_checkpoints(tmp_path_factory):
    """The same checkpoints, written from the reference's modules (transformers + peft, synthetic.write_checkpoint):
    what the reference reads in the parity tests, so that the files it compares on do not depend on jina_v4."""
    root = tmp_path_factory.mktemp("ref-ckpt")
    return {t.name: write_checkpoint(root / t.name, t, seed=i) for i, t in enumerate(CONFIGS)}


@pytest.fixture(scope="session")
def references(reference_checkpoints):
    from reference import Reference

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Reference(reference_checkpoints[name])
        return cache[name]

    return get


def model_cache(checkpoints):
    """get(name, dtype="float32") -> a JinaV4 of that tiny checkpoint, loaded once per cache."""
    from jina_v4 import JinaV4

    cache = {}

    def get(name, dtype="float32"):
        if (name, dtype) not in cache:
            cache[name, dtype] = JinaV4.from_pretrained(checkpoints[name], device="cpu", dtype=dtype)
        return cache[name, dtype]

    return get


@pytest.fixture(scope="session")
def models(checkpoints):
    return model_cache(checkpoints)


@pytest.fixture(scope="session")
def rounding(models):
    """rounding(name, *kinds, run=None) -> E, the emulated fp32 error of checkpoint `name` (tolerances.py): the
    largest over the probe's outputs of those kinds ("text", "text-multi", "image", "image-multi") and, when
    given, over `run(model)`'s outputs. Tests bound jina_v4 against the reference by FP32 x E, and one
    implementation against itself in other batches by SAME x E. The probe (every text and image size of the
    parity tests, in all three tasks) runs once per checkpoint."""
    from tolerances import float64_copy, fp32_error, fp32_runs

    wide, probes = {}, {}

    def get(name, *kinds, run=None):
        if name not in wide:
            wide[name] = float64_copy(models(name))
            probes[name] = probe_errors(lambda run: fp32_runs(wide[name], run))
        extra = [fp32_error(wide[name], run)] if run is not None else []
        return max([probes[name][k] for k in kinds] + extra)

    return get


@pytest.fixture(scope="session")
def bf16_rounding(models):
    """bf16_rounding(name, *kinds, run=None) -> E for bf16 (tolerances.bf16_error), as `rounding` for fp32:
    the bf16 model against the exact float64 run of the fp32 weights. Tests bound bf16 against an fp32
    result by BF16 x E."""
    from tolerances import bf16_error, bf16_runs, float64_copy

    wide, probes = {}, {}

    def get(name, *kinds, run=None):
        if name not in wide:
            wide[name] = float64_copy(models(name))
            probes[name] = probe_errors(lambda r: bf16_runs(models(name, "bfloat16"), wide[name], r))
        extra = [bf16_error(models(name, "bfloat16"), wide[name], run)] if run is not None else []
        return max([probes[name][k] for k in kinds] + extra)

    return get


def probe_errors(runs) -> dict[str, float]:
    """The emulated error over the probe: every text and image size of the parity tests, three tasks, both heads
    from one forward each. runs(run) -> (emulated outputs, exact outputs)."""
    from jina_v4 import Both, encode

    from test_images import SIZES, picture
    from test_text_parity import TEXTS

    images = [picture(h, w, seed=i, noise=12) for i, (h, w) in enumerate(SIZES)]
    out = dict.fromkeys(["text", "text-multi", "image", "image-multi"], 0.0)
    for task in ("retrieval", "text-matching", "code"):
        for kind, inputs in (("text", TEXTS), ("image", [{"image": x} for x in images])):
            with torch.no_grad():
                narrow, exact = runs(lambda m: encode(m, m.prepare(inputs, task), Both()))
            for (s, m), (es, em) in zip(narrow, exact):
                out[kind] = max(out[kind], float((s.double() - es.double()).abs().max()))
                out[kind + "-multi"] = max(out[kind + "-multi"], float((m.double() - em.double()).abs().max()))
    return out


@pytest.fixture(scope="session")
def batch_tol(rounding):
    """batch_tol(name) -> the bound between jina_v4's vectors computed in two different batches (the CLI, the
    server, Ray, shards against the Python API): one implementation, other row counts and kernels, SAME x E
    over every kind of output (tolerances.py)."""
    from tolerances import SAME

    return lambda name: SAME * rounding(name, "text", "image", "text-multi", "image-multi")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and spares a shared machine's cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=[t.name for t in CONFIGS])
def name(request):
    return request.param


def padded_hidden_states(
    model, input_ids, attention_mask=None, task="retrieval", pixel_values=None, image_grid_thw=None, all_layers=False
):
    """The reference's `get_last_hidden_states` form through jina_v4's packed forward: right-padded (B, L) ids
    -> (B, L, D) final-normed states, zero at padding (or every layer's, num_hidden_layers + 1 tensors).
    Image rows take their patches and grids in row order."""
    from jina_v4.model.processing import Item

    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    grids = [] if image_grid_thw is None else [tuple(g) for g in image_grid_thw.tolist()]
    items, start = [], 0
    for row, m in zip(input_ids, mask):
        item = Item(row[m.bool()].tolist(), task)
        if model.config.image_token_id in item.input_ids:
            item.grid = grids.pop(0)
            n = item.grid[0] * item.grid[1] * item.grid[2]
            item.pixel_values, start = pixel_values[start : start + n], start + n
        items.append(item)
    layers = [] if all_layers else None
    with torch.inference_mode():
        h = model(model.processor.collate(items), hidden_states=layers)

    def unpack(x):  # (T, D) -> (B, L, D)
        out = x.new_zeros(*input_ids.shape, x.shape[-1])
        out[mask.bool()] = x
        return out

    return [unpack(x) for x in layers] if all_layers else unpack(h)
