"""Tests for the stdlib docstring corpus and the byte-level BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from cortex import textdata
from cortex.textdata import TextDataError

SMALL_CAP = 200_000


@pytest.fixture(scope="module")
def small_corpus() -> list[str]:
    return textdata.build_corpus(max_chars=SMALL_CAP)


def test_corpus_respects_cap(small_corpus: list[str]) -> None:
    total = sum(len(text) for text in small_corpus)
    assert 0 < total <= SMALL_CAP
    assert total > SMALL_CAP // 2


def test_corpus_is_deterministic(small_corpus: list[str]) -> None:
    assert textdata.build_corpus(max_chars=SMALL_CAP) == small_corpus


def test_corpus_documents_are_unique_english_text(small_corpus: list[str]) -> None:
    assert len(set(small_corpus)) == len(small_corpus)
    assert all(len(text) >= textdata.MIN_DOCSTRING_CHARS for text in small_corpus)
    words = " ".join(small_corpus).split()
    assert words.count("the") > 100


def test_stdlib_walk_skips_tests_and_private_modules() -> None:
    root = textdata.stdlib_root()
    relative = [path.relative_to(root).parts for path in textdata.iter_stdlib_files(root)]
    assert ("json", "__init__.py") in relative
    assert ("inspect.py",) in relative
    for parts in relative:
        assert "test" not in parts[:-1]
        assert not parts[-1].startswith("_") or parts[-1] == "__init__.py"
        assert not any(part.startswith("_") for part in parts[:-1])


def test_extract_docstrings_reads_module_class_function() -> None:
    source = '''
"""Module text that is long enough to keep in the corpus."""
class Thing:
    """Class text that is long enough to keep in the corpus."""
    def run(self):
        """Function text that is long enough to keep in the corpus."""
        """Not a docstring, because it is the second statement."""
def short():
    """Too short."""
'''
    docs = textdata.extract_docstrings(source)
    assert [doc.split()[0] for doc in docs] == ["Module", "Class", "Function"]


def test_extract_docstrings_of_invalid_source_is_empty() -> None:
    assert textdata.extract_docstrings("def broken(:\n") == []


def test_split_is_disjoint_and_stable(small_corpus: list[str]) -> None:
    train, held_out = textdata.split_corpus(small_corpus, held_out_fraction=0.1)
    assert len(train) + len(held_out) == len(small_corpus)
    assert not set(train) & set(held_out)
    assert 0 < len(held_out) < len(small_corpus) // 4
    # A document's side does not depend on which other documents are present.
    train_reversed, held_out_reversed = textdata.split_corpus(small_corpus[::-1], held_out_fraction=0.1)
    assert set(held_out_reversed) == set(held_out)
    assert set(train_reversed) == set(train)


def test_split_rejects_invalid_fraction() -> None:
    with pytest.raises(TextDataError, match="held_out_fraction"):
        textdata.split_corpus(["some text"], held_out_fraction=1.0)


def test_tokenizer_rejects_tiny_vocab() -> None:
    with pytest.raises(TextDataError, match="vocab_size 100"):
        textdata.train_bpe_tokenizer(["text"], vocab_size=100)


def test_tokenizer_round_trips_through_auto_tokenizer(small_corpus: list[str], tmp_path: Path) -> None:
    tokenizer = textdata.train_bpe_tokenizer(small_corpus[:300], vocab_size=600)
    assert tokenizer.get_vocab_size() == 600
    textdata.save_tokenizer(tokenizer, tmp_path, model_max_length=256)

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = textdata.special_token_ids(tokenizer)
    assert loaded.bos_token_id == ids["bos"]
    assert loaded.eos_token_id == ids["eos"]
    assert loaded.pad_token_id == ids["pad"]
    assert loaded.model_max_length == 256

    # Byte-level BPE encodes any text, including characters never seen in training.
    text = "Return the value of x.\n  Émile 中文 🙂"
    encoded = loaded(text)["input_ids"]
    assert encoded[0] == ids["bos"]
    assert loaded.unk_token_id is None or loaded.unk_token_id not in encoded
    assert loaded.decode(encoded, skip_special_tokens=True) == text


def test_tokenizer_merges_common_words(small_corpus: list[str]) -> None:
    tokenizer = textdata.train_bpe_tokenizer(small_corpus, vocab_size=2000)
    plain = tokenizer.encode("Return the value", add_special_tokens=False)
    assert len(plain.ids) == 3
