"""Every cost of the library and CLI path grows linearly with its input. Proven two ways, never by racing the clock:
by counting the work (each read of an Encoding's per-token lists builds a whole new list, so reading one per token
is quadratic), and by running sizes far past the old trouble under deadlines a hundred times above what they take
now and a hundred times below what the quadratic path took (a 680 KB text: about four hours)."""

import pytest

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
