"""`jina-v4 mteb` and jina_v4 as an MTEB model (jina_v4/apps/mteb_model.py), with MTEB's own evaluation code on tasks
built here from small local data (no hub): text retrieval, STS, code retrieval and image-document retrieval, each
with single vectors, multi-vectors and a Matryoshka dim; the main scores equal `jina-v4 eval` on the same data
written as its folders; MTEB's own v4 wrapper (JinaV4Wrapper), given a jina_v4 model in place of the remote code,
scores the same; the prompt and adapter of every task type MTEB's wrapper maps; the result files, the refusals."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

mteb = pytest.importorskip("mteb")

from datasets import Dataset
from mteb.abstasks.sts import AbsTaskSTS
from mteb.models.model_implementations.jina_models import JinaV4Wrapper
from mteb.types import PromptType
from scipy.stats import spearmanr

from jina_v4 import JinaV4
from jina_v4.apps import cli, evaluate
from jina_v4.apps import mteb_model as mm
from jina_v4.apps.mteb_model import MODEL_PROMPTS, JinaV4MTEB, MTEBError, folder_task, local_metadata

from test_evaluate import image_data, text_data, write_beir

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "gqa2-sharded"
DIM = 16  # one of the tiny checkpoint's Matryoshka dims
MODES = {"single": {}, "multi": {"multivector": True}, f"dim{DIM}": {"dim": DIM}}


def main_score(encoder, task) -> float:
    result = mteb.evaluate(encoder, [task], cache=None, show_progress_bar=False)
    return result.task_results[0].get_score()


def mteb_rounded(x: float) -> float:
    """MTEB's retrieval metrics are means rounded to 5 decimals (its retrieval_metrics.py): its figure is the
    exact one rounded so, which no tolerance stands in for."""
    return round(x, 5)


metadata = local_metadata  # what a test task needs


PAIRS = [
    ("A man plays a guitar.", "Someone is playing an instrument.", 4.5),
    ("A dog runs in the park.", "The stock market fell today.", 0.2),
    ("Rising seas flood the coast.", "The coast floods as the sea rises.", 4.8),
    ("She bakes bread at dawn.", "Bread is baked early in the morning.", 4.0),
    ("Chess is a board game.", "A mountain trail in winter.", 0.5),
    ("Python functions return values.", "A function in Python gives back a value.", 3.9),
    ("The cat sleeps on the sofa.", "A cat naps on the couch.", 4.2),
    ("Trains leave at noon.", "Whales sing in the ocean.", 0.1),
]


class PairsSTS(AbsTaskSTS):
    metadata = metadata("LocalPairsSTS", "STS", main_score="cosine_spearman")
    min_score, max_score = 0, 5

    def load_data(self, num_proc=None, **kwargs) -> None:
        s1, s2, score = zip(*PAIRS)
        self.dataset = {"test": Dataset.from_dict({"sentence1": s1, "sentence2": s2, "score": score})}
        self.data_loaded = True


CODE_DOCS = [
    {"_id": "c0", "text": "def add(a, b):\n    return a + b"},
    {"_id": "c1", "text": "def read_lines(path):\n    return open(path).read().splitlines()"},
    {"_id": "c2", "text": "class Stack:\n    def push(self, x):\n        self.items.append(x)"},
    {"_id": "c3", "text": "for i in range(10):\n    print(i * i)"},
    {"_id": "c4", "text": "import json\ndata = json.loads(text)"},
    {"_id": "c5", "text": "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)"},
]
CODE_QUERIES = ["sum two numbers", "read a file's lines", "push onto a stack", "print squares", "parse json", "fib"]


def code_data(root):
    queries = [{"_id": f"q{i}", "text": t} for i, t in enumerate(CODE_QUERIES)]
    qrels = {f"q{i}": {f"c{i}": 1, f"c{(i + 2) % 6}": i % 2} for i in range(6)}
    return write_beir(root, CODE_DOCS, queries, qrels)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mteb-data")
    pages = image_data(root / "vdr")[0]
    (pages / "corpus.jsonl").unlink()  # the image-document layout: images/<id>.png
    return {
        "text": text_data(root / "beir")[0],
        "code": code_data(root / "code"),
        "image": pages,
    }


def tasks(folders):
    return {
        "text": folder_task(folders["text"]),
        "code": folder_task(folders["code"], name="LocalCode", eval_langs=["python-Code"]),
        "image": folder_task(folders["image"]),
    }


# ---- MTEB's conventions --------------------------------------------------------------------------------------------


def test_the_prompt_map_is_mtebs():
    """MODEL_PROMPTS is what the installed mteb's ModelMeta for v4 gives its JinaV4Wrapper."""
    meta = mteb.get_model_meta("jinaai/jina-embeddings-v4")
    assert meta.loader is JinaV4Wrapper
    assert meta.loader_kwargs["model_prompts"] == MODEL_PROMPTS


PAGES = {"category": "t2i", "modalities": ["text", "image"]}
CASES = [  # (task type, extra metadata, prompt type) -> (adapter, prompt), for every type MTEB's wrapper maps
    ("Retrieval", {}, PromptType.query, ("retrieval", "query")),
    ("Retrieval", {}, PromptType.document, ("retrieval", "passage")),
    ("STS", {"main_score": "cosine_spearman"}, None, ("text-matching", "query")),
    ("PairClassification", {"main_score": "max_ap"}, None, ("text-matching", "query")),
    ("DocumentUnderstanding", PAGES, PromptType.query, ("retrieval", "query")),
    ("DocumentUnderstanding", PAGES, PromptType.document, ("retrieval", "query")),
    ("Retrieval", {"eval_langs": ["python-Code"]}, PromptType.query, ("code", "query")),
    ("Retrieval", {"eval_langs": ["python-Code"]}, PromptType.document, ("code", "passage")),
    ("Retrieval", {"domains": ["Programming"]}, PromptType.document, ("code", "passage")),
    ("STS", {"main_score": "cosine_spearman", "domains": ["Programming"]}, None, ("code", "query")),
]


@pytest.mark.parametrize("type_, extra, prompt_type, expected", CASES, ids=lambda x: str(x)[:40])
def test_each_mapped_type_gets_the_wrappers_adapter_and_prompt(models, type_, extra, prompt_type, expected):
    model = models(NAME)
    task_metadata = metadata(f"Local{type_}", type_, **extra)
    ours = JinaV4MTEB(model)
    assert ours.resolve(task_metadata, prompt_type) == expected
    wrapper = object.__new__(JinaV4Wrapper)  # its __init__ loads the remote code; only its prompt map is needed here
    wrapper.model_prompts = dict(MODEL_PROMPTS)
    base_task, prompt_name, _ = wrapper._resolve_task_parameters(task_metadata, prompt_type)
    assert (base_task, prompt_name) == expected

    calls = []  # what the model is asked for: the adapter and prompt reach encode_text

    class Spy:
        def __getattr__(self, name):
            return getattr(model, name)

        def encode_text(self, texts, **kw):
            calls.append((kw["task"], kw["prompt_name"]))
            return model.encode_text(texts, **kw)

    spy = JinaV4MTEB(model)
    spy.model = Spy()
    got = spy.encode([{"text": ["a text", "another"]}], task_metadata=task_metadata, hf_split="test",
                     hf_subset="default", prompt_type=prompt_type)  # fmt: skip
    assert calls == [expected]
    want = model.encode_text(["a text", "another"], task=expected[0], prompt_name=expected[1])
    assert torch.equal(torch.as_tensor(got), want)


def test_deterministic_reaches_the_model(models, monkeypatch):
    model, seen = models(NAME), []
    real = model.encode_text
    spy = lambda texts, **kw: seen.append(kw.get("deterministic")) or real(texts, **kw)  # noqa: E731
    monkeypatch.setattr(model, "encode_text", spy)
    kw = dict(task_metadata=metadata("LocalSTS", "STS", main_score="cosine_spearman"), hf_split="t", hf_subset="d")
    JinaV4MTEB(model).encode([{"text": ["x"]}], **kw)
    JinaV4MTEB(model, deterministic=True).encode([{"text": ["x"]}], **kw)
    assert seen == [None, True]


def test_an_unmapped_task_type_is_refused_with_its_name(models):
    encoder = JinaV4MTEB(models(NAME))
    for type_, score in (("Classification", "accuracy"), ("Clustering", "v_measure")):
        with pytest.raises(MTEBError, match=f"MTEB task type '{type_}' has no jina-v4 adapter"):
            encoder.encode([{"text": ["x"]}], task_metadata=metadata("LocalX", type_, main_score=score),
                           hf_split="test", hf_subset="default")  # fmt: skip
    mapped = JinaV4MTEB(models(NAME), task_map={"Classification": "text-matching"})
    assert mapped.resolve(metadata("LocalX", "Classification", main_score="accuracy")) == ("text-matching", "query")
    with pytest.raises(MTEBError, match="unknown task 'nope'"):
        JinaV4MTEB(models(NAME), task_map={"STS": "nope"})


def test_images_at_the_wrappers_pixel_budget_and_fused_with_text(models, monkeypatch):
    model = models(NAME)
    from test_images import picture

    img = picture(56, 84, seed=3)
    seen = []
    real = model.encode_image

    def spy(images, **kw):
        seen.append(kw["max_pixels"])
        return real(images, **kw)

    monkeypatch.setattr(model, "encode_image", spy)
    task_metadata = metadata("LocalDU", "DocumentUnderstanding", category="it2i", modalities=["text", "image"])
    batch = [{"text": ["a caption"], "image": [img]}]
    kw = dict(task_metadata=task_metadata, hf_split="test", hf_subset="default", prompt_type=PromptType.document)
    fused = JinaV4MTEB(model).encode(batch, **kw)
    assert mm.MAX_PIXELS == 37788800 and seen == [37788800]
    t = model.encode_text(["a caption"], task="retrieval", prompt_name="query")
    i = model.encode_image([img], task="retrieval", max_pixels=mm.MAX_PIXELS)
    assert torch.allclose(torch.as_tensor(fused), torch.nn.functional.normalize(t + i, dim=-1), atol=0, rtol=0)
    multi = JinaV4MTEB(model, multivector=True).encode(batch, **kw)
    tm = model.encode_text(["a caption"], task="retrieval", return_multivector=True)[0]
    im = model.encode_image([img], task="retrieval", return_multivector=True, max_pixels=mm.MAX_PIXELS)[0]
    assert len(multi) == 1 and torch.equal(multi[0], torch.cat([tm, im]))


# ---- scores with MTEB's evaluation code, against `jina-v4 eval` ------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", ["text", "code", "image"])
def test_retrieval_main_score_equals_jina_v4_eval(models, folders, kind, mode):
    model = models(NAME)
    encoder = JinaV4MTEB(model, **MODES[mode])
    task = tasks(folders)[kind]
    assert task.metadata.type == ("DocumentUnderstanding" if kind == "image" else "Retrieval")
    data = evaluate.read_dataset(folders[kind])
    expected = evaluate.evaluate(model, data, "code" if kind == "code" else "retrieval", ks=(10,), **MODES[mode])
    got = main_score(encoder, task)
    assert got == pytest.approx(mteb_rounded(expected["ndcg@10"]), abs=1e-12)
    assert 0 < got < 1  # not saturated: a wrong order would show
    if kind == "code":  # the code adapter was used: the retrieval adapter scores otherwise
        other = evaluate.evaluate(model, data, "retrieval", ks=(10,), **MODES[mode])["ndcg@10"]
        assert other != pytest.approx(got, abs=1e-6)


@pytest.mark.parametrize("mode", ["single", f"dim{DIM}"])
def test_sts_main_score(models, mode):
    """cosine_spearman: Spearman of the text-matching vectors' cosines with the gold scores."""
    model = models(NAME)
    got = main_score(JinaV4MTEB(model, **MODES[mode]), PairsSTS())
    s1, s2, gold = zip(*PAIRS)
    kw = dict(task="text-matching", truncate_dim=MODES[mode].get("dim"))
    a, b = model.encode_text(list(s1), **kw), model.encode_text(list(s2), **kw)
    assert got == pytest.approx(spearmanr((a * b).sum(-1).numpy(), gold).statistic, abs=1e-6)


def test_sts_with_multivectors_is_refused_before_any_work(models, tmp_path):
    encoder = JinaV4MTEB(models(NAME), multivector=True)
    with pytest.raises(MTEBError, match="LocalPairsSTS: MTEB's STS evaluator takes cosine.*without --multivector"):
        mm.run(encoder, [PairsSTS()], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["single", "multi"])
def test_mtebs_own_wrapper_with_a_jina_v4_model_scores_the_same(models, folders, mode):
    """JinaV4Wrapper as mteb ships it, its remote-code model replaced by a JinaV4: built with object.__new__ (its
    __init__ would load the remote code with transformers) and given the attributes __init__ sets: model,
    model_prompts (from mteb's own ModelMeta), vector_type, device, and the ModelMeta that mteb's loader attaches
    (its modalities let image tasks run). It calls encode_text(texts=, batch_size=,
    return_multivector=, prompt_name=, task=, return_numpy=) and encode_image(images=, batch_size=, max_pixels=,
    return_multivector=, task=, return_numpy=) on it."""
    model = models(NAME)
    wrapper = object.__new__(JinaV4Wrapper)
    wrapper.model = model
    wrapper.mteb_model_meta = mteb.get_model_meta("jinaai/jina-embeddings-v4")
    wrapper.model_prompts = wrapper.mteb_model_meta.loader_kwargs["model_prompts"]
    wrapper.vector_type = "multi_vector" if mode == "multi" else "single_vector"
    wrapper.device = "cpu"
    ours = JinaV4MTEB(model, **MODES[mode])
    for kind, task in [*tasks(folders).items(), *([("sts", PairsSTS())] if mode == "single" else [])]:
        assert main_score(wrapper, task) == pytest.approx(main_score(ours, task), abs=1e-6), kind


def test_a_model_changed_in_python_is_scored_without_saving(checkpoints, folders):
    """NOTES.md's last-token pooling recipe: its score differs from the released pooling's and equals
    `jina-v4 eval` of the same changed model."""
    from torch import nn

    class LastTokenPooling(nn.Module):
        def forward(self, h, batch):
            last = [start + n - 1 for start, n in zip(batch.seqs.cu, batch.seqs.lengths)]
            return h[torch.tensor(last, device=h.device)]

    model = JinaV4.from_pretrained(checkpoints[NAME], device="cpu", dtype="float32")
    task = tasks(folders)["text"]
    data = evaluate.read_dataset(folders["text"])
    released = main_score(JinaV4MTEB(model), task)
    model.pooling = LastTokenPooling()
    changed = main_score(JinaV4MTEB(model, name="last-token"), task)
    assert changed != pytest.approx(released, abs=1e-6)
    assert changed == pytest.approx(mteb_rounded(evaluate.evaluate(model, data, ks=(10,))["ndcg@10"]), abs=1e-12)


def test_an_added_task_is_scored_through_the_task_map(checkpoints, folders):
    """model.add_task (a copy of the code adapter under a new name), mapped to MTEB's Retrieval keys: MTEB scores
    it as `jina-v4 eval --task mine` does, and unlike the retrieval adapter."""
    model = JinaV4.from_pretrained(checkpoints[NAME], device="cpu", dtype="float32")
    model.add_task("mine", init_from="code")
    mapping = {"Retrieval-query": "mine.query", "Retrieval-document": "mine.passage"}
    task, data = tasks(folders)["text"], evaluate.read_dataset(folders["text"])
    got = main_score(JinaV4MTEB(model, task_map=mapping, name="mine"), task)
    assert got == pytest.approx(mteb_rounded(evaluate.evaluate(model, data, "mine", ks=(10,))["ndcg@10"]), abs=1e-12)
    assert got != pytest.approx(main_score(JinaV4MTEB(model), task), abs=1e-6)


# ---- the command, MTEB's result files, refusals ---------------------------------------------------------------------


def test_cli_writes_mtebs_result_files(checkpoints, folders, tmp_path, capsys):
    out = tmp_path / "results"
    ckpt = str(checkpoints[NAME])
    args = ["mteb", "--model", ckpt, "--tasks", str(folders["text"]), "--dtype", "float32", "--quiet", "-o", str(out)]
    assert cli.main([*args, "--name", "base"]) == 0
    printed = capsys.readouterr().out
    (model_dir,) = (out / "results").iterdir()
    (revision,) = model_dir.iterdir()
    assert model_dir.name == "jina-v4__base" and revision.name.endswith(mm.git_commit())
    assert revision.name.startswith(mm.checkpoint_revision(ckpt))
    task = folder_task(folders["text"])
    loaded = mteb.ResultCache(out).load_results(models=["jina-v4/base"], tasks=[task], include_remote=False)
    (result,) = loaded.model_results[0].task_results
    data = evaluate.read_dataset(folders["text"])
    expected = evaluate.evaluate(JinaV4.from_pretrained(ckpt, device="cpu", dtype="float32"), data, ks=(10,))
    assert result.get_score() == pytest.approx(mteb_rounded(expected["ndcg@10"]), abs=1e-12)
    assert f"{result.get_score():.4f}" in printed and "Local-beir" in printed
    meta = json.loads((revision / "model_meta.json").read_text())
    assert meta["name"] == "jina-v4/base" and meta["revision"] == revision.name

    # another variant into the same folder: refused, then written beside with --overwrite
    assert cli.main([*args, "--name", "other"]) == 1
    assert "holds results of another model or revision (jina-v4__base/" in capsys.readouterr().err
    assert cli.main([*args, "--name", "other", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "results").iterdir()) == ["jina-v4__base", "jina-v4__other"]
    assert not list(tmp_path.glob(".results.partial-*"))


def test_an_interrupted_run_leaves_no_partial_result(models, folders, tmp_path, monkeypatch):
    encoder = JinaV4MTEB(models(NAME), name="interrupted")
    text, code = tasks(folders)["text"], tasks(folders)["code"]
    real = JinaV4MTEB.encode

    def interrupted(self, inputs, **kw):
        if kw["task_metadata"].name == "LocalCode":
            raise KeyboardInterrupt
        return real(self, inputs, **kw)

    monkeypatch.setattr(JinaV4MTEB, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mm.run(encoder, [text, code], tmp_path / "out")
    (folder,) = (tmp_path / "out" / "results" / "jina-v4__interrupted").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["Local-beir.json", "model_meta.json", "run_settings.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left
    monkeypatch.undo()
    rows = mm.run(encoder, [text, code], tmp_path / "out")  # the rerun keeps the finished task, runs the other
    assert [r["seconds"] is None for r in rows] == [True, False]
    assert (folder / "LocalCode.json").is_file()


@pytest.mark.slow  # mteb.get_benchmarks() builds every benchmark: seconds
def test_unknown_names_list_the_nearest(capsys):
    with pytest.raises(MTEBError, match=r"'NFCorpuss' is not an MTEB task; the nearest: NFCorpus"):
        mm.get_tasks(["NFCorpuss"])
    with pytest.raises(MTEBError, match=r"'ViDoRe\(v9\)' is not an MTEB benchmark; the nearest: ViDoRe\(v"):
        mm.get_tasks(benchmark="ViDoRe(v9)")
    assert cli.main(["mteb", "--tasks", "SciFactt", "-o", "unused"]) == 1
    assert "the nearest: SciFact" in capsys.readouterr().err
    assert cli.main(["mteb", "--tasks", "SciFact", "--task", "code", "-o", "unused"]) == 1
    assert "picks adapters by MTEB task type; use --task-map" in capsys.readouterr().err


def test_the_benchmarks_of_the_paper_table_exist():
    """NOTES.md's table names these; they must be in the installed mteb."""
    names = {b.name for b in mteb.get_benchmarks()}
    notes = (Path(__file__).parents[1] / "NOTES.md").read_text(encoding="utf-8")
    section = notes.split("### v4's published figures in MTEB", 1)[1]
    table = next(block for block in section.split("\n\n") if block.startswith("|"))
    named = [cell.strip().strip("`") for line in table.splitlines()[2:] for cell in [line.split("|")[2]]]
    assert named and all(n in names for n in named), [n for n in named if n not in names]


def test_without_mteb_the_error_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mteb", None)  # `import mteb` raises ImportError
    monkeypatch.delitem(sys.modules, "jina_v4.apps.mteb_model")
    assert cli.main(["mteb", "--tasks", "SciFact", "-o", "unused"]) == 1
    assert "pip install 'jina_v4[mteb]'" in capsys.readouterr().err


@pytest.mark.slow  # a process of its own
def test_jina_v4_imports_no_mteb():
    code = "import sys, jina_v4; from jina_v4.apps import cli, evaluate; cli.parser([]); print('mteb' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
