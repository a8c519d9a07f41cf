"""Offline English text and a byte-level BPE tokenizer for demo and test models.

The corpus is the docstrings of the Python standard library that runs this code.
It needs no network and no data download, and it is mostly English prose about
code. Docstrings are read by parsing the `.py` files with `ast`, never by
importing them, so no module code runs.

Order is deterministic: files are walked in sorted relative-path order, and
within a file the module docstring comes first, then class and function
docstrings in the breadth-first order of `ast.walk`. Test packages, private modules (any path
component that starts with `_`, except `__init__.py`) and `site-packages` are
skipped. The train and held-out split is decided per document by a CRC-32 of
its text, so a document stays on the same side whatever the cap or the order.

Tokenizer folder format, as `transformers.AutoTokenizer.from_pretrained` reads it:

- `tokenizer.json`: the `tokenizers` serialization (byte-level BPE, a
  post-processor that puts `BOS_TOKEN` before every encoded text).
- `tokenizer_config.json`: `tokenizer_class`, `bos_token`, `eos_token`,
  `pad_token` and `model_max_length`.
"""

from __future__ import annotations

import ast
import inspect
import json
import logging
import sysconfig
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)

DEFAULT_MAX_CHARS = 8_000_000
DEFAULT_HELD_OUT_FRACTION = 0.05
MIN_DOCSTRING_CHARS = 40

# Directory names under the stdlib root whose files are tests, third-party
# packages or tool data rather than documented library code.
_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__"})


class TextDataError(Exception):
    """An invalid argument or unreadable input while building a corpus or tokenizer."""


def stdlib_root() -> Path:
    """Return the directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_files(root: Path | None = None) -> Iterator[Path]:
    """Yield the public, non-test `.py` files under `root` in sorted relative-path order."""
    base = root if root is not None else stdlib_root()
    if not base.is_dir():
        raise TextDataError(f"standard library directory {base} not found, so pass root= explicitly")
    for path in sorted(base.rglob("*.py"), key=lambda p: p.relative_to(base).as_posix()):
        parts = path.relative_to(base).parts
        if any(part in _SKIPPED_DIRS for part in parts[:-1]):
            continue
        if any(part.startswith("_") for part in parts[:-1]):
            continue
        name = parts[-1]
        if name.startswith("_") and name != "__init__.py":
            continue
        if name.startswith("test_"):
            continue
        yield path


def extract_docstrings(source: str) -> list[str]:
    """Return the cleaned docstrings of a module's source, module docstring first.

    Returns an empty list when the source does not parse (some stdlib files are
    templates or target other Python versions).
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    docstrings = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        raw = ast.get_docstring(node, clean=False)
        if raw is None:
            continue
        text = inspect.cleandoc(raw).strip()
        if len(text) >= MIN_DOCSTRING_CHARS:
            docstrings.append(text)
    return docstrings


def build_corpus(max_chars: int = DEFAULT_MAX_CHARS, root: Path | None = None) -> list[str]:
    """Collect stdlib docstrings as documents until adding one would pass `max_chars`.

    Exact duplicates are dropped (many overriding methods repeat a docstring).
    The same interpreter and `max_chars` always give the same list.
    """
    if max_chars <= 0:
        raise TextDataError(f"max_chars must be positive, got {max_chars}")
    documents: list[str] = []
    seen: set[str] = set()
    total = 0
    for path in iter_stdlib_files(root):
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as error:
            logger.debug("skipping %s: %s", path, error)
            continue
        for text in extract_docstrings(source):
            if text in seen:
                continue
            if total + len(text) > max_chars:
                logger.info("corpus reached the cap of %d chars with %d documents", max_chars, len(documents))
                return documents
            seen.add(text)
            documents.append(text)
            total += len(text)
    logger.info("corpus has %d documents, %d chars (cap %d)", len(documents), total, max_chars)
    return documents


def is_held_out(text: str, held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION) -> bool:
    """Return whether `text` belongs to the held-out split, by a CRC-32 of its UTF-8 bytes."""
    if not 0.0 <= held_out_fraction < 1.0:
        raise TextDataError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    return zlib.crc32(text.encode("utf-8")) % 10_000 < round(held_out_fraction * 10_000)


def split_corpus(
    documents: Sequence[str], held_out_fraction: float = DEFAULT_HELD_OUT_FRACTION
) -> tuple[list[str], list[str]]:
    """Split documents into (train, held_out), keeping their order within each split."""
    train: list[str] = []
    held_out: list[str] = []
    for text in documents:
        (held_out if is_held_out(text, held_out_fraction) else train).append(text)
    return train, held_out


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts` with the BOS, EOS and PAD special tokens.

    Byte-level means every string encodes, whatever its characters. Encoding
    with special tokens puts `BOS_TOKEN` first. Appending EOS is left to the caller.
    """
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise TextDataError(
            f"vocab_size {vocab_size} is below {minimum} (256 byte tokens plus the special tokens)"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    logger.info("trained a byte-level BPE tokenizer with %d tokens", tokenizer.get_vocab_size())
    return tokenizer


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Return the ids of the special tokens as {"bos": ..., "eos": ..., "pad": ...}."""
    ids = {}
    for key, token in (("bos", BOS_TOKEN), ("eos", EOS_TOKEN), ("pad", PAD_TOKEN)):
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise TextDataError(f"tokenizer has no {token!r}, so train it with train_bpe_tokenizer")
        ids[key] = token_id
    return ids


def save_tokenizer(tokenizer: Tokenizer, folder: Path, model_max_length: int) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` into `folder` (created if missing)."""
    special_token_ids(tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
