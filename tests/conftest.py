import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))  # reference.py, the oracle (also used by parity.py)

from synthetic import CONFIGS, write_checkpoint  # noqa: E402

torch.set_num_threads(max(1, min(4, torch.get_num_threads())))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> directory of a tiny checkpoint in the released layout, written once per session."""
    root = tmp_path_factory.mktemp("ckpt")
    return {t.name: write_checkpoint(root / t.name, t, seed=i) for i, t in enumerate(CONFIGS)}


@pytest.fixture(scope="session")
def references(checkpoints):
    from reference import Reference

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Reference(checkpoints[name])
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


def padded_hidden_states(model, input_ids, attention_mask=None, task="retrieval", pixel_values=None,
                         image_grid_thw=None, all_layers=False):
    """The reference's `get_last_hidden_states` form through jina_v4's packed forward: right-padded (B, L) ids
    -> (B, L, D) final-normed states, zero at padding (or every layer's, num_hidden_layers + 1 tensors).
    Image rows take their patches and grids in row order."""
    from jina_v4.processing import Item

    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    grids = [] if image_grid_thw is None else [tuple(g) for g in image_grid_thw.tolist()]
    items, start = [], 0
    for row, m in zip(input_ids, mask):
        item = Item(row[m.bool()].tolist(), task)
        if model.config.image_token_id in item.input_ids:
            item.grid = grids.pop(0)
            n = item.grid[0] * item.grid[1] * item.grid[2]
            item.pixel_values, start = pixel_values[start:start + n], start + n
        items.append(item)
    layers = [] if all_layers else None
    with torch.inference_mode():
        h = model(model.processor.collate(items), hidden_states=layers)

    def unpack(x):  # (T, D) -> (B, L, D)
        out = x.new_zeros(*input_ids.shape, x.shape[-1])
        out[mask.bool()] = x
        return out

    return [unpack(x) for x in layers] if all_layers else unpack(h)
