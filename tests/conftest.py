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


@pytest.fixture(scope="session")
def models(checkpoints):
    from jina_v4 import JinaV4

    cache = {}

    def get(name, dtype="float32"):
        if (name, dtype) not in cache:
            cache[name, dtype] = JinaV4.from_pretrained(checkpoints[name], device="cpu", dtype=dtype)
        return cache[name, dtype]

    return get


@pytest.fixture(params=[t.name for t in CONFIGS])
def name(request):
    return request.param
