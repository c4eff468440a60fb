"""`jina-v4 eval` (jina_v4/apps/evaluate.py): the metrics equal pytrec_eval's (trec_eval's code, test-only) on
generated runs with ties, unjudged documents, queries without relevant documents and graded relevance; the whole
path on small generated data sets, text (BEIR layout) and images (the image-document folder), single vectors,
Matryoshka and MaxSim, the cache and the CLI."""

import json
import random

import pytest
import pytrec_eval
import torch

from jina_v4 import maxsim
from jina_v4.apps import cli, evaluate
from jina_v4.apps.evaluate import DataError, ranking, read_dataset

from test_images import picture

pytestmark = pytest.mark.usefixtures("one_thread")
KS = (1, 3, 5, 10, 20)


def generated(seed: int):
    """qrels with grades 0..3 (some queries with none >= 1, some judged documents never retrieved) and a run
    whose scores take few distinct values (ties), including unjudged documents and queries absent from qrels."""
    rng = random.Random(seed)
    docs = [f"d{rng.randrange(10**4)}" for _ in range(40)]
    qrels, run = {}, {}
    for q in range(12):
        qid = f"q{q}"
        judged = rng.sample(docs + ["never-retrieved-1", "never-retrieved-2"], rng.randint(1, 10))
        grades = [0] * 3 if q == 0 else [rng.choice([0, 0, 1, 2, 3]) for _ in judged]
        if q != 11:  # q11: a run without qrels
            qrels[qid] = dict(zip(judged, grades[: len(judged)] + [0] * (len(judged) - len(grades))))
        run[qid] = {d: float(rng.randint(0, 6)) / 2 for d in rng.sample(docs, rng.randint(5, 35))}
    return qrels, run


@pytest.mark.parametrize("seed", range(20))
def test_metrics_equal_pytrec_eval(seed):
    qrels, run = generated(seed)
    measures = {f"ndcg_cut.{','.join(map(str, KS))}", f"recall.{','.join(map(str, KS))}", "recip_rank"}
    expected = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    mean, per_query = evaluate.evaluate_run({q: ranking(s) for q, s in run.items()}, qrels, KS)
    with_relevant = {q for q in run if q in qrels and any(g >= 1 for g in qrels[q].values())}
    assert set(per_query) == with_relevant and "q11" not in per_query
    for q in with_relevant:
        for k in KS:
            assert per_query[q][f"ndcg@{k}"] == pytest.approx(expected[q][f"ndcg_cut_{k}"], abs=1e-12)
            assert per_query[q][f"recall@{k}"] == pytest.approx(expected[q][f"recall_{k}"], abs=1e-12)
            # trec_eval's recip_rank is over the whole ranking: MRR@k keeps it when the first hit is in the top k
            rr = expected[q]["recip_rank"]
            assert per_query[q][f"mrr@{k}"] == pytest.approx(rr if rr > 0 and 1 / rr <= k + 1e-9 else 0.0, abs=1e-12)
    for k in KS:
        ours = sum(expected[q][f"ndcg_cut_{k}"] for q in with_relevant) / len(with_relevant)
        assert mean[f"ndcg@{k}"] == pytest.approx(ours, abs=1e-12)


def test_ties_follow_trec_eval_and_the_matrix_ranking():
    assert ranking({"a": 1.0, "b": 1.0, "c": 2.0, "ab": 1.0}) == ["c", "b", "ab", "a"]
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (6, 30), generator=g).float()  # many ties
    ids = [f"doc{i}" for i in range(30)]
    got = evaluate.rank_matrix(scores, ids, 7)
    for row, ranked in zip(scores, got):
        assert ranked == ranking(dict(zip(ids, row.tolist())), 7)


def write_beir(root, docs, queries, qrels, split="test"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in queries))
    rows = "".join(f"{q}\t{d}\t{g}\n" for q, judged in qrels.items() for d, g in judged.items())
    (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + rows)
    return root


TOPICS = ["coastal flooding", "python functions", "bread baking", "mountain hiking", "stock markets", "chess"]


def text_data(root):
    docs = [
        {"_id": f"t{i}", "title": t.title(), "text": f"A passage about {t}, part {j}."}
        for i, t in enumerate(TOPICS)
        for j in range(1)
    ]
    docs += [{"_id": f"u{i}", "title": "", "text": f"Notes on {t} and more {t}."} for i, t in enumerate(TOPICS)]
    queries = [{"_id": f"q{i}", "text": f"what about {t}?"} for i, t in enumerate(TOPICS)]
    queries.append({"_id": "q-none", "text": "a query without relevant documents"})
    qrels = {f"q{i}": {f"t{i}": 2, f"u{i}": 1, f"u{(i + 1) % 6}": 0} for i in range(6)}
    qrels["q-none"] = {"t0": 0}
    qrels["q-missing"] = {"t1": 1}  # not in queries.jsonl
    return write_beir(root, docs, queries, qrels), docs, queries, qrels


def expected_metrics(model, docs, queries, qrels, multivector=False, dim=None):
    """The same vectors through model.encode and pytrec_eval, independently of evaluate.py's path."""
    qids = [q["_id"] for q in queries if q["_id"] in qrels and any(g >= 1 for g in qrels[q["_id"]].values())]
    texts = {q["_id"]: q["text"] for q in queries}
    inputs = [
        {"image": d["image"]}
        if "image" in d
        else {"text": f"{d['title']} {d['text']}" if d.get("title") else d["text"]}
        for d in docs
    ]
    kw = {"task": "retrieval", "return_multivector": multivector, "truncate_dim": dim}
    d = model.encode(inputs, prompt_name="passage", **kw)
    q = model.encode([{"text": texts[i]} for i in qids], prompt_name="query", **kw)
    s = maxsim(q, d) if multivector else q @ d.T
    run = {qid: {doc["_id"]: float(v) for doc, v in zip(docs, row)} for qid, row in zip(qids, s)}
    measures = {"ndcg_cut.1,3,5,10", "recall.1,3,5,10", "recip_rank"}
    return pytrec_eval.RelevanceEvaluator({q: qrels[q] for q in qids}, measures).evaluate(run)


def assert_matches(result, expected):
    for k in (1, 3, 5, 10):
        mean = sum(v[f"ndcg_cut_{k}"] for v in expected.values()) / len(expected)
        assert result[f"ndcg@{k}"] == pytest.approx(mean, abs=1e-9)
        mean = sum(v[f"recall_{k}"] for v in expected.values()) / len(expected)
        assert result[f"recall@{k}"] == pytest.approx(mean, abs=1e-9)


def test_text_end_to_end_with_cache(models, checkpoints, tmp_path, monkeypatch):
    model = models("gqa2-sharded")
    root, docs, queries, qrels = text_data(tmp_path / "beir")
    data = read_dataset(root)
    assert data.split == "test" and data.corpus[0] == (
        "t0",
        {"text": "Coastal Flooding A passage about coastal flooding, part 0."},
    )
    assert data.skipped == {"no relevant document": 1, "not in queries.jsonl": 1}
    cache = evaluate.Cache(tmp_path / "cache")
    kw = dict(ks=(1, 3, 5, 10), cache=cache, model_name=str(checkpoints["gqa2-sharded"]))
    result = evaluate.evaluate(model, data, "retrieval", **kw)
    assert result["counts"]["queries"] == 6 and set(result["per_query"]) == {f"q{i}" for i in range(6)}
    assert_matches(result, expected_metrics(model, docs, queries, qrels))
    assert len(list((tmp_path / "cache").iterdir())) == 2  # corpus and queries

    def no_embedding(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(evaluate, "embed", no_embedding)
    again = evaluate.evaluate(model, data, "retrieval", **kw)
    assert again == result
    truncated = evaluate.evaluate(model, data, "retrieval", dim=16, **kw)  # single vectors cut from the cache
    assert truncated["settings"]["dim"] == 16
    assert_matches(truncated, expected_metrics(model, docs, queries, qrels, dim=16))
    monkeypatch.undo()
    evaluate.evaluate(model, data, "code", **kw)  # another task: new vectors
    assert len(list((tmp_path / "cache").iterdir())) == 4


def image_data(root):
    (root / "images").mkdir(parents=True)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (220, 220, 40)]
    docs = []
    for i, size in enumerate([(56, 84), (100, 140), (84, 56), (60, 200)]):
        img = picture(*size, seed=i)
        img.paste(colours[i], (0, 0, size[1] // 2, size[0] // 2))
        img.save(root / "images" / f"page{i}.png")
        docs.append({"_id": f"page{i}", "image": root / "images" / f"page{i}.png"})
    queries = [{"_id": f"q{i}", "text": f"page number {i}"} for i in range(4)]
    qrels = {f"q{i}": {f"page{i}": 1, f"page{(i + 1) % 4}": i % 2} for i in range(4)}
    return write_beir(root, [], queries, qrels, split="dev"), docs, queries, qrels


def test_images_end_to_end_cli(models, checkpoints, tmp_path, capsys):
    root, docs, queries, qrels = image_data(tmp_path / "vdr")
    (root / "corpus.jsonl").unlink()  # the image-document layout: images/<id>.png
    data = read_dataset(root)
    assert data.split == "dev" and [i for i, _ in data.corpus] == ["page0", "page1", "page2", "page3"]
    out = tmp_path / "results.json"
    args = ["eval", "--model", str(checkpoints["gqa2-sharded"]), "--data", str(root), "--multivector"]
    assert cli.main([*args, "--k", "1", "3", "5", "10", "--dtype", "float32", "-o", str(out)]) == 0
    printed = capsys.readouterr()
    assert "multi-vector MaxSim" in printed.out and "nDCG@k" in printed.out
    assert "corpus" in printed.err  # the progress bar
    result = json.loads(out.read_text())
    assert {"ndcg@10", "recall@10", "mrr@10", "settings", "counts"} <= set(result)
    assert result["settings"]["mode"] == "multivector" and result["counts"]["documents"] == 4
    assert_matches(result, expected_metrics(models("gqa2-sharded"), docs, queries, qrels, multivector=True))
    cached = [*args, "--dtype", "float32", "--cache", str(tmp_path / "cache"), "--quiet", "-o", str(out)]
    for _ in range(2):  # the second run reads the multi-vectors back from the cache
        assert cli.main(cached) == 0
        assert json.loads(out.read_text())["ndcg@10"] == result["ndcg@10"]
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_mixed_corpus_of_texts_and_images(models, tmp_path):
    root, docs, queries, qrels = image_data(tmp_path / "mixed")
    docs = [{"_id": d["_id"], "image": f"images/{d['_id']}.png"} for d in docs]
    docs.append({"_id": "text0", "title": "Page zero", "text": "the first page"})
    write_beir(root, docs, queries, {**qrels, "q0": {"page0": 1, "text0": 2}}, split="dev")
    data = read_dataset(root, "dev")
    assert (
        data.corpus[0][1] == {"image": root / "images" / "page0.png"}
        and data.corpus[-1][1]["text"] == "Page zero the first page"
    )
    result = evaluate.evaluate(models("gqa2-sharded"), data, ks=(1, 3, 5, 10))
    resolved = [{**d, "image": root / d["image"]} if "image" in d else d for d in docs]
    expected = expected_metrics(models("gqa2-sharded"), resolved, queries, {**qrels, "q0": {"page0": 1, "text0": 2}})
    assert_matches(result, expected)


def test_bad_data_and_options_are_named(models, tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        read_dataset(tmp_path / "nothing")
    root, *_ = text_data(tmp_path / "beir")
    (root / "qrels" / "test.tsv").rename(root / "qrels" / "train.tsv")
    (root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq0\tt0\n")
    with pytest.raises(DataError, match=r"choose a split with --split \(found \['dev', 'train'\]\)"):
        read_dataset(root)
    with pytest.raises(DataError, match=r"dev.tsv:2: expected 'query-id<TAB>corpus-id<TAB>score'"):
        read_dataset(root, "dev")
    (root / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\nnot json\n')
    (root / "qrels" / "dev.tsv").write_text("q0\tt0\t1\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:2: not JSON"):
        read_dataset(root, "dev")
    (root / "corpus.jsonl").write_text('{"_id": "a", "image": "missing.png"}\n')
    with pytest.raises(DataError, match="corpus.jsonl:1: image 'missing.png' is not a file"):
        read_dataset(root, "dev")
    (root / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n')
    data = read_dataset(root, "dev")
    with pytest.raises(ValueError, match="multi-vectors are never truncated"):
        evaluate.evaluate(models("gqa2-sharded"), data, multivector=True, dim=16)
    with pytest.raises(ValueError, match="k must be positive"):
        evaluate.evaluate(models("gqa2-sharded"), data, ks=(0,))
