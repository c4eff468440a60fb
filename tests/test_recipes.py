"""The research recipes of NOTES.md, read from NOTES.md and run as written on a tiny checkpoint, each checked
for the effect it promises (so the recipes and the code cannot drift apart)."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tolerances import FP32, SAME

NOTES = Path(__file__).parents[1] / "NOTES.md"
RECIPES = dict(re.findall(r"```python recipe=(\w+)\n(.*?)```", NOTES.read_text(encoding="utf-8"), re.S))
NAME = "gqa2-sharded"


def test_every_recipe_is_checked():
    assert set(RECIPES) == {"setup", "hidden_states", *CHECKS}


@pytest.fixture
def run(checkpoints):
    """run(recipe) -> the namespace after the setup recipe (on a fresh tiny model) and the recipe itself."""

    def go(name):
        ns = {}
        setup = RECIPES["setup"].replace('"jinaai/jina-embeddings-v4"', repr(str(checkpoints[NAME])))
        exec(compile(setup, "NOTES.md:setup", "exec"), ns)
        exec(compile(RECIPES[name], f"NOTES.md:{name}", "exec"), ns)
        return ns

    return go


def mean_of(model, h, batch):
    spans = [h[a : a + n] for a, n in zip(batch.seqs.cu, batch.seqs.lengths)]
    return F.normalize(torch.stack([s.mean(0) for s in spans]), dim=-1)


def check_hidden_states(ns, tol):
    model, layers, h = ns["model"], ns["layers"], ns["h"]
    assert len(layers) == model.config.text_config.num_hidden_layers + 1 and torch.equal(layers[-1], h)
    assert [len(x) for x in ns["per_text"]] == [len(it.input_ids) for it in ns["items"]]


def check_attention_kernel(ns, tol):
    default = ns["model"].encode_text(ns["texts"], task="retrieval")
    assert (ns["masked"] - default).abs().max() <= FP32 * tol  # another kernel: a second implementation


def check_last_token(ns, tol):
    model, texts = ns["model"], ns["texts"]
    batch = model.processor.collate(model.prepare(texts, "retrieval"))
    with torch.inference_mode():
        h = model(batch)
    last = F.normalize(h[[a + n - 1 for a, n in zip(batch.seqs.cu, batch.seqs.lengths)]], dim=-1)
    assert (ns["last_token"] - last).abs().max() <= SAME * tol
    assert (model.encode_text(texts, task="retrieval") - mean_of(model, h, batch)).abs().max() <= SAME * tol


def check_new_head(ns, tol):
    model, small = ns["model"], ns["small"]
    batch = model.processor.collate(model.prepare(ns["texts"], "retrieval"))
    with torch.inference_mode():
        h = model(batch)
        expected = F.normalize(model.small_projector(h), dim=-1).split(batch.seqs.lengths)
    assert [s.shape for s in small] == [(n, 64) for n in batch.seqs.lengths]
    assert all((a - b).abs().max() <= SAME * tol for a, b in zip(small, expected))


def check_new_task(ns, tol):
    from jina_v4.model.processing import Item

    model = ns["model"]
    assert model.tasks["qa"].query == "Question: " and model.tasks["qa"].passage == "Answer: "
    item = model.prepare(["why is the sea salty?"], "qa")[0]
    ids = model.processor.tokenize(["Question: why is the sea salty?"])[0].input_ids
    assert item.input_ids == ids
    # qa starts as a copy of retrieval's adapter: the same ids under retrieval give the same vector
    assert torch.equal(ns["question"], model.encode_items([Item(ids, "retrieval")])[0])
    answer_ids = model.processor.tokenize(["Answer: rivers carry salts into it"])[0].input_ids
    assert model.prepare(["rivers carry salts into it"], "qa", "passage")[0].input_ids == answer_ids


def check_bidirectional(ns, tol):
    model, texts = ns["model"], ns["texts"]
    causal = model.encode_text(texts, task="retrieval")
    assert (ns["both_ways"] - causal).abs().max() > 100 * tol  # the first tokens now see the later ones
    assert all(layer.self_attn.causal for layer in model.model.layers)


def check_drop_layers(ns, tol):
    model, k = ns["model"], ns["k"]
    batch = model.processor.collate(model.prepare(ns["texts"], "retrieval"))
    layers = []
    with torch.inference_mode():
        model(batch, hidden_states=layers)
        expected = mean_of(model, model.model.norm(layers[-1 - k]), batch)  # the input of layer L - k, normed
    assert (ns["shallow"] - expected).abs().max() <= SAME * tol
    assert len(model.model.layers) == model.config.text_config.num_hidden_layers


def check_pixel_budget(ns, tol):
    model, page = ns["model"], ns["page"]
    assert torch.equal(ns["small_page"], ns["same_page"])
    grid = model.prepare([page], "retrieval")[0].grid
    assert grid[1] * grid[2] * 14 * 14 <= 200_000
    model.processor.image_cfg = type(model.processor.image_cfg).from_dict(
        {**model.processor.image_cfg.__dict__, "max_pixels": 602_112}
    )
    assert (model.encode_image(page, task="retrieval") - ns["same_page"]).abs().max() > 1e-3  # another grid


CHECKS = {
    "attention_kernel": check_attention_kernel,
    "last_token": check_last_token,
    "new_head": check_new_head,
    "new_task": check_new_task,
    "bidirectional": check_bidirectional,
    "drop_layers": check_drop_layers,
    "pixel_budget": check_pixel_budget,
}


@pytest.mark.parametrize("name", ["hidden_states", *CHECKS])
def test_recipe(run, rounding, name):
    ns = run(name)
    (CHECKS.get(name) or check_hidden_states)(ns, rounding(NAME, "text", "image"))
