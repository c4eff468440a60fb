"""Every cost of the library and CLI path grows linearly with its input. Proven two ways, never by racing the clock:
by counting the work (each read of an Encoding's per-token lists builds a whole new list, so reading one per token
is quadratic), and by running sizes far past the old trouble under a deadline many times what they take now (a few
seconds) and far below what the quadratic path took (a 680 KB text: about two hours; NOTES.md)."""

import json
import time
import warnings

import numpy as np
import pytest
import torch

from test_cli import run
from test_properties import processors  # noqa: F401 (a fixture)

LISTS = ("ids", "offsets", "word_ids", "tokens", "type_ids", "attention_mask", "special_tokens_mask")


class Counted:
    """An Encoding whose per-token lists are counted as they are read (each read builds a new list)."""

    def __init__(self, encoding, reads: list):
        self._encoding, self._reads = encoding, reads

    def __getattr__(self, name):
        if name in LISTS:
            self._reads.append(name)
        return getattr(self._encoding, name)

    def __len__(self):
        return len(self._encoding)


class CountingTokenizer:
    """tokenizers.Tokenizer's methods are read-only: wrap the object, and its encodings, instead."""

    def __init__(self, tokenizer):
        self.tokenizer, self.reads = tokenizer, []

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def encode(self, text, **kw):
        return Counted(self.tokenizer.encode(text, **kw), self.reads)

    def encode_batch(self, texts, **kw):
        return [Counted(e, self.reads) for e in self.tokenizer.encode_batch(texts, **kw)]


@pytest.fixture
def counting(models, monkeypatch):
    p = models("gqa2-sharded").processor
    tokenizer = CountingTokenizer(p.tokenizer)
    monkeypatch.setattr(p, "tokenizer", tokenizer)
    return p, tokenizer


@pytest.mark.parametrize(
    "make",
    [
        lambda k: "abc " * (k // 4),  # many words: the cut falls between words
        lambda k: "a" * k,  # one word longer than the cut
        lambda k: "the sea rises " * (k // 28) + "x" * k,  # words, then one word across the cut
    ],
    ids=["words", "one-word", "word-across-the-cut"],
)
def test_each_text_reads_the_token_lists_a_fixed_number_of_times(counting, make):
    """Whatever its length and max_length, a text costs the same few reads of the per-token lists: none per
    token. The text is twice as long as the cut ((max_length + 2) x 20 characters here) or more."""
    p, tokenizer = counting
    counts = []
    for n in (25, 100, 400):
        for k in (2, 8):
            tokenizer.reads.clear()
            item = p.tokenize([make(k * (n + 2) * p.token_chars)], n)[0]
            assert len(item.input_ids) == n
            counts.append(len(tokenizer.reads))
    assert len(set(counts)) == 1 and counts[0] <= 8, counts


@pytest.mark.parametrize("which", ["tiny", "qwen"])
def test_a_word_across_the_cut_keeps_the_whole_texts_tokens(processors, which):  # noqa: F811
    """A word longer than the cut is read no further than the cut when a token boundary in it lies where no merge
    can cross (processing.settled): its kept tokens and offsets are still the whole text's first n, and
    `dropped` a true lower bound. Words of a few letters (é decomposed in some, NFC composes it) make such
    boundaries rare enough for both vocabularies that some words are cut and some are tokenized whole; the few
    short words before it never fill the n tokens."""
    import random

    p, inside, whole = processors[which], 0, 0
    for seed in range(40):
        rng = random.Random(seed)
        n = rng.randint(1, 40)
        letters = rng.choice([*"ab xyz qjv aé 海平面 ωψ s d".split(), ["k", "e\u0301"]])
        head = " ".join("".join(rng.choices(letters, k=rng.randint(1, 4))) for _ in range(rng.randint(0, n // 8)))
        text = head + " " + "".join(rng.choices(letters, k=3 * (n + 2) * p.token_chars))
        full = p.tokenizer.encode(text, add_special_tokens=True)
        item = p.tokenize([text], n)[0]
        assert item.input_ids == full.ids[:n] and item.offsets == full.offsets[:n], (seed, letters)
        assert item.dropped == len(full.ids) - n if not item.cut else 1 <= item.dropped <= len(full.ids) - n
        inside += item.cut > 0 and item.offsets[-1][1] > len(head) + 1  # kept tokens of the long word
        whole += item.cut == 0
    assert inside >= 5 and whole >= 5, (inside, whole)  # both ways were taken: cut in the word, and tokenized whole


def test_many_short_texts_are_tokenized_once_each(counting):
    """10,000 short texts: one batch call to the tokenizer, no text tokenized again, two list reads per text."""
    p, tokenizer = counting
    calls = []
    encode = tokenizer.encode
    tokenizer.encode = lambda text, **kw: calls.append(text) or encode(text, **kw)
    items = p.tokenize([f"Query: text number {i}" for i in range(10_000)])
    assert len(items) == 10_000 and calls == [] and len(tokenizer.reads) == 2 * 10_000


DEADLINE = 120  # seconds; each takes a few on 2 loaded cores, where the quadratic path took hours (NOTES.md)


@pytest.mark.parametrize(
    "inputs",
    [
        lambda: ["the sea rises along the coast; " * 260_000],  # 8 MB of words
        lambda: ["a" * 30_000_000],  # one word of 30 MB
        lambda: [f"text number {i}" for i in range(100_000)],  # 100 k short texts
    ],
    ids=["8MB-of-words", "30MB-word", "100k-texts"],
)
def test_long_and_many_inputs_prepare_in_seconds(models, inputs):
    model, inputs = models("gqa2-sharded"), inputs()
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long texts' warning: tokens past max_length were dropped
        items = model.prepare(inputs, task="retrieval")
    elapsed = time.monotonic() - start
    assert elapsed < DEADLINE, f"{elapsed:.1f} s"
    first = model.processor.tokenizer.encode("Query: " + inputs[0][:100_000])
    assert len(items) == len(inputs) and items[0].input_ids == first.ids[: len(items[0].input_ids)]


@pytest.fixture(scope="module")
def long_line():
    """A 2 MB line of words."""
    return "the sea rises along the coast and the city moves inland, " * 36_000


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_embed_input_with_a_2mb_line(checkpoints, models, tmp_path, long_line, suffix):
    """jina-v4 embed --input: a corpus whose one line is 2 MB (a text file, and a JSONL text field) gives, bit for
    bit (--deterministic), the vectors model.encode_text gives the same texts cut the same way, within a wide
    deadline."""
    path = tmp_path / f"corpus{suffix}"
    lines = [json.dumps({"text": t}) for t in (long_line, "short")] if suffix == ".jsonl" else [long_line, "short"]
    path.write_text("\n".join(lines) + "\n")
    ckpt, o = checkpoints["gqa4-single"], tmp_path / "o.npy"
    start = time.monotonic()
    out = run("embed", "--input", path, "--model", ckpt, "--max-length", 512, "--deterministic", "-o", o)
    elapsed = time.monotonic() - start
    assert elapsed < DEADLINE, f"{elapsed:.1f} s"
    assert "at least" in out.stderr and "tokens past max_length=512 were dropped" in out.stderr
    with pytest.warns(UserWarning, match="tokens past max_length=512"):
        expected = models("gqa4-single").encode_text(
            [long_line, "short"], task="retrieval", max_length=512, deterministic=True
        )
    assert torch.equal(torch.from_numpy(np.load(o)), expected)
