"""Training data for a cell: token arrays, batches and bits per byte.

A cell's ``data`` field names one of three sources:

``"stdlib-docs"``
    The embedded default corpus: the documentation that every CPython
    installation carries, namely the pydoc topics (``pydoc_data.topics``) and
    the module, class and function docstrings of the public standard library
    modules. Byte-level tokens (vocabulary 256, one token per UTF-8 byte).
``"txt:/abs/dir"``
    Every ``.txt`` file under the directory, recursively, in sorted order of
    relative path. Byte-level tokens as above.
``"shards:/abs/dir"``
    Pre-tokenised FineWeb shards in the format of modded-nanogpt and the
    OpenAI parameter-golf baseline (see ``read_shard_header``), with a
    SentencePiece tokenizer that gives the byte length of every token id.
    ``"shards:/abs/dir?tokenizer=/abs/file.model"`` names the tokenizer when
    it is not the only ``.model`` file in the shard directory.
A data set name from ``DATASETS``, such as ``"fineweb10B_sp1024"``
    Shards and tokenizer at fixed places under the directory that the
    environment variable ``QAT_DATA_ROOT`` names, read when the data is
    opened. The name contains no path, so manifests that use it are the same on
    every machine.

``resolve_data`` validates a user's ``--data`` value on the login node with
cheap checks, and ``check_data`` validates a cell's ``data`` the same way
before submission. ``load_corpus`` opens the data on the compute node, building and
caching byte-level sources once per cache directory. ``get_batch`` draws
training batches from the seed and step number alone, so a resumed run gets
the same batches. ``val_batches`` and ``bits_per_byte`` serve evaluation.
"""

from __future__ import annotations

import ast
import codecs
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import logging
import math
import os
import pkgutil
import re
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

STDLIB_DOCS = "stdlib-docs"
TXT_PREFIX = "txt:"
SHARDS_PREFIX = "shards:"
TOKENIZER_SEPARATOR = "?tokenizer="

BYTE_VOCAB_SIZE = 256
# The last 5% of a byte-level text is the validation split. The cut is at a
# byte index, so the two splits never share a byte.
VAL_FRACTION = 0.05

# Upper bound on the embedded corpus. CPython 3.11.7 on Linux yields 1,800,441
# bytes, so the bound only cuts on versions with more documentation.
STDLIB_MAX_BYTES = 2_000_000
# Bump whenever the extraction below changes, so cached corpora are rebuilt.
STDLIB_BUILDER_VERSION = 1

# Shard format of modded-nanogpt and parameter-golf: a header of 256
# little-endian int32 (magic, version, token count, then unused), followed by
# the tokens as little-endian uint16.
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
SHARD_HEADER_BYTES = SHARD_HEADER_INTS * 4
SHARD_TOKEN_DTYPE = np.dtype("<u2")
# Tokens read from the start, middle and end of each shard for the vocabulary
# check and the fingerprint. The reads stay small on a shared file system.
SHARD_SAMPLE_TOKENS = 32_768

SPACE_MARKER = "\u2581"  # SentencePiece writes a space as U+2581

# Environment variable naming the directory under which data sets are found,
# on every machine that submits or runs cells. A cell stores only the name.
DATA_ROOT_ENV = "QAT_DATA_ROOT"


class DataError(ValueError):
    """Invalid, missing or malformed training data; the message names the path and the fix."""


class ShardedTokens:
    """Read-only 1-D token sequence made of several memory-mapped shards, in order.

    Supports ``len``, integer indexing and contiguous slices, which is all
    that ``get_batch`` and ``val_batches`` use. A slice that crosses a shard
    boundary returns a new array that joins the pieces. ``np.asarray`` reads
    every shard into memory, so avoid it on real data sets.
    """

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        if not parts:
            raise ValueError("ShardedTokens needs at least one shard")
        self.parts = list(parts)
        self.dtype = self.parts[0].dtype
        self.starts = np.cumsum([0] + [len(part) for part in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def size(self) -> int:
        return len(self)

    @property
    def ndim(self) -> int:
        return 1

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError(f"ShardedTokens supports only contiguous slices, not step {step}")
            return self._read(start, max(start, stop))
        position = int(index)
        if position < 0:
            position += len(self)
        if not 0 <= position < len(self):
            raise IndexError(f"token index {index} out of range for {len(self)} tokens")
        part = int(np.searchsorted(self.starts, position, side="right")) - 1
        return self.parts[part][position - self.starts[part]]

    def _read(self, start: int, stop: int) -> np.ndarray:
        pieces = []
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        for part in range(max(first, 0), len(self.parts)):
            part_start = int(self.starts[part])
            if part_start >= stop:
                break
            lo = max(start, part_start) - part_start
            hi = min(stop, int(self.starts[part + 1])) - part_start
            pieces.append(self.parts[part][lo:hi])
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            return np.empty(0, dtype=self.dtype)
        return np.concatenate(pieces)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        joined = np.concatenate(self.parts)
        return joined if dtype is None else joined.astype(dtype)


TokenArray = Union[np.ndarray, ShardedTokens]


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """Tokens of one data source, split into training and validation."""

    train: TokenArray  # 1-D uint8 (byte-level) or uint16 (shards), memory-mapped
    val: TokenArray  # never overlaps train
    vocab_size: int
    bytes_per_token: np.ndarray | None  # float64 bytes per token id; None when every token is 1 byte
    fingerprint: str  # 16 hex digits of SHA-256 over the content, for result files
    description: str  # one line for logs: source, sizes, vocabulary


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A named pre-tokenised data set: shards and tokenizer at fixed places under the data root."""

    name: str
    shard_dir: str  # relative to the data root; contains *_train_*.bin and *_val_*.bin
    tokenizer: str  # SentencePiece model, relative to the data root
    vocab_size: int  # pieces of the tokenizer; a different count means the wrong file


# The layout is that of the parameter-golf download script
# (`cached_challenge_fineweb.py --variant sp1024` in openai/parameter-golf),
# whose data/ folder is the data root: 1024-piece SentencePiece BPE shards of
# FineWeb, 100M tokens per training shard, and the fixed validation split.
DATASETS: dict[str, Dataset] = {
    dataset.name: dataset
    for dataset in (
        Dataset(
            name="fineweb10B_sp1024",
            shard_dir="datasets/fineweb10B_sp1024",
            tokenizer="tokenizers/fineweb_1024_bpe.model",
            vocab_size=1024,
        ),
    )
}


# ---------------------------------------------------------------------------
# Parsing and login-node validation
# ---------------------------------------------------------------------------


def resolve_data(spec: str, tokenizer: str | os.PathLike | None = None) -> str:
    """Validate a user's data value and return the canonical cell ``data`` string.

    Accepted values are ``"stdlib-docs"``, a data set name from ``DATASETS``,
    ``"txt:DIR"``, ``"shards:DIR"`` (optionally with ``?tokenizer=FILE``) and a
    bare directory, whose kind is detected from its contents. A data set name
    wins over a directory of the same name (write ``./NAME`` for the
    directory). Relative paths become absolute. The checks are cheap:
    directory listings, shard headers, the tokenizer model and a few thousand
    tokens per shard, never a full read.

    Parameters
    ----------
    spec
        The value given to ``--data``.
    tokenizer
        SentencePiece ``.model`` file for shards whose directory does not
        contain exactly one ``.model`` file.

    Returns
    -------
    str
        ``"stdlib-docs"``, the data set name, ``"txt:/abs/dir"``,
        ``"shards:/abs/dir"`` or ``"shards:/abs/dir?tokenizer=/abs/file.model"``.

    Raises
    ------
    DataError
        When the value names no usable data; the message names the fix.
    """
    spec = spec.strip()
    if spec == STDLIB_DOCS:
        if tokenizer is not None:
            raise DataError(f"a tokenizer ({tokenizer}) applies only to shards:DIR data, not to {spec!r}")
        return STDLIB_DOCS
    if spec in DATASETS:
        if tokenizer is not None:
            raise DataError(
                f"a tokenizer ({tokenizer}) applies only to shards:DIR data; data set {spec!r} "
                "has its own tokenizer"
            )
        check_data(spec)
        return spec

    if spec.startswith(TXT_PREFIX) or spec.startswith(SHARDS_PREFIX):
        kind, directory, spec_tokenizer = parse_data(spec)
    elif spec:
        directory = _absolute(spec)
        kind = _detect_kind(directory)
        spec_tokenizer = None
    else:
        raise DataError(_usage("data value is empty"))

    if tokenizer is not None:
        if kind != "shards":
            raise DataError(f"a tokenizer ({tokenizer}) applies only to shards:DIR data, not to {spec!r}")
        if spec_tokenizer is not None and _absolute(tokenizer) != spec_tokenizer:
            raise DataError(
                f"two tokenizers given: {spec_tokenizer} in {spec!r} and {tokenizer}; give only one"
            )
        spec_tokenizer = _absolute(tokenizer)

    if kind == "txt":
        _list_txt_files(directory)
        return TXT_PREFIX + str(directory)

    _, model_path = _check_shards(directory, spec_tokenizer)
    canonical = SHARDS_PREFIX + str(directory)
    if spec_tokenizer is not None:
        canonical += TOKENIZER_SEPARATOR + str(model_path)
    return canonical


def parse_data(data: str) -> tuple[str, Path | None, Path | None]:
    """Split a cell ``data`` string into (kind, directory, tokenizer).

    Kind is ``"stdlib-docs"``, ``"txt"`` or ``"shards"``. The directory is None
    for the embedded corpus and the tokenizer is None unless given explicitly.
    A data set name is kind ``"shards"``, with both paths under the data root
    (see ``locate_dataset``). Only the syntax and the data root are checked
    here, not the files.
    """
    if data == STDLIB_DOCS:
        return STDLIB_DOCS, None, None
    if data in DATASETS:
        directory, tokenizer = locate_dataset(data)
        return "shards", directory, tokenizer
    if data.startswith(TXT_PREFIX):
        rest = data[len(TXT_PREFIX):]
        if TOKENIZER_SEPARATOR in rest:
            raise DataError(f"invalid data {data!r}: a tokenizer applies only to shards:DIR data")
        return "txt", _absolute(_nonempty_path(rest, data)), None
    if data.startswith(SHARDS_PREFIX):
        rest = data[len(SHARDS_PREFIX):]
        directory, separator, model = rest.partition(TOKENIZER_SEPARATOR)
        tokenizer = _absolute(_nonempty_path(model, data)) if separator else None
        return "shards", _absolute(_nonempty_path(directory, data)), tokenizer
    raise DataError(_usage(f"invalid data {data!r}"))


def _usage(problem: str) -> str:
    return (
        f"{problem}; expected {STDLIB_DOCS!r}, a data set name ({', '.join(DATASETS)}), "
        "'txt:DIR' (a directory of .txt files), "
        "'shards:DIR' (a directory of *_train_*.bin and *_val_*.bin shards) or a directory path"
    )


def data_root(name: str) -> Path:
    """Return the absolute data root that ``QAT_DATA_ROOT`` names; errors name the data set ``name``.

    Raises
    ------
    DataError
        When the variable is unset, empty or not a directory.
    """
    dataset = DATASETS[name]
    value = os.environ.get(DATA_ROOT_ENV, "").strip()
    layout = f"{dataset.shard_dir}/ and {dataset.tokenizer}"
    if not value:
        raise DataError(
            f"data set {name!r} is read from the directory that {DATA_ROOT_ENV} names, but "
            f"{DATA_ROOT_ENV} is not set; set it to the directory that contains {layout} "
            "(the data/ folder of a parameter-golf download), or pass --data"
        )
    root = _absolute(value)
    if not root.is_dir():
        raise DataError(
            f"{DATA_ROOT_ENV}={value} is not a directory; set it to the directory that contains {layout}"
        )
    return root


def locate_dataset(name: str) -> tuple[Path, Path]:
    """Return (shard directory, tokenizer model) of a named data set under the data root.

    Raises
    ------
    DataError
        When ``name`` is not in ``DATASETS`` or the data root is not set (see ``data_root``).
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}")
    root = data_root(name)
    dataset = DATASETS[name]
    return root / dataset.shard_dir, root / dataset.tokenizer


def check_data(data: str, vocab_size: int | None = None) -> None:
    """Check a cell's ``data`` cheaply before submission, so a bad source fails on the login node.

    Runs the checks of ``resolve_data``: directory listings, shard headers and
    sizes, the tokenizer model and three blocks of tokens per shard. For a
    data set name it also checks that the data root contains the shard directory
    and the tokenizer and that the tokenizer has the data set's vocabulary.

    Parameters
    ----------
    data
        A cell's ``data`` string.
    vocab_size
        The cells' ``vocab_size``. When given, data whose token ids need a
        larger vocabulary is rejected here instead of on the compute node.

    Raises
    ------
    DataError
        With one line naming the missing or malformed file and the fix.
    """
    if data in DATASETS:
        data_vocab = _check_dataset(data)
    else:
        kind, directory, tokenizer = parse_data(data)
        if kind == STDLIB_DOCS:
            data_vocab = BYTE_VOCAB_SIZE
        elif kind == "txt":
            _list_txt_files(directory)
            data_vocab = BYTE_VOCAB_SIZE
        else:
            data_vocab, _ = _check_shards(directory, tokenizer)
    if vocab_size is not None and data_vocab > vocab_size:
        raise DataError(
            f"data {data!r} has a vocabulary of {data_vocab} tokens but the cells' vocab_size is "
            f"{vocab_size}; set vocab_size to at least {data_vocab} in the phase spec"
        )


def data_vocab_size(data: str) -> int:
    """Return the vocabulary that a cell's ``data`` needs.

    256 for byte-level data and the registered size for a data set name,
    neither of which touches a file. For ``shards:`` data the tokenizer model
    is loaded.

    Raises
    ------
    DataError
        When the data string is invalid or the shards' tokenizer is missing or invalid.
    """
    if data in DATASETS:
        return DATASETS[data].vocab_size
    kind, directory, tokenizer = parse_data(data)
    if kind != "shards":
        return BYTE_VOCAB_SIZE
    _require_directory(directory)
    return _load_tokenizer(_find_tokenizer(directory, tokenizer)).get_piece_size()


def _check_dataset(name: str) -> int:
    dataset = DATASETS[name]
    root = data_root(name)
    directory, model_path = root / dataset.shard_dir, root / dataset.tokenizer
    if not directory.is_dir():
        raise DataError(
            f"shard directory {directory} of data set {name!r} not found; {DATA_ROOT_ENV}={root} "
            f"must contain {dataset.shard_dir}/ (download it or point {DATA_ROOT_ENV} elsewhere)"
        )
    if not model_path.is_file():
        raise DataError(
            f"tokenizer {model_path} of data set {name!r} not found; {DATA_ROOT_ENV}={root} "
            f"must contain {dataset.tokenizer}"
        )
    # The tokenizer first, so a wrong tokenizer is named as such and not
    # reported as shards with out-of-range token ids.
    vocab_size = _load_tokenizer(model_path).get_piece_size()
    _check_dataset_vocab(name, model_path, vocab_size)
    _check_shards(directory, model_path)
    return vocab_size


def _check_dataset_vocab(name: str, model_path: Path, vocab_size: int) -> None:
    expected = DATASETS[name].vocab_size
    if vocab_size != expected:
        raise DataError(
            f"tokenizer {model_path} has {vocab_size} pieces, but data set {name!r} has a vocabulary "
            f"of {expected}; replace it with the tokenizer that made the shards"
        )


def _nonempty_path(text: str, data: str) -> str:
    if not text:
        raise DataError(_usage(f"invalid data {data!r}: the path is empty"))
    return text


def _absolute(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _require_directory(directory: Path) -> None:
    if not directory.exists():
        raise DataError(f"data directory {directory} not found; check the path or create it")
    if not directory.is_dir():
        raise DataError(f"data path {directory} is not a directory; give the directory that contains it")


def _detect_kind(directory: Path) -> str:
    _require_directory(directory)
    has_shards = any(_is_shard_name(path.name) for path in directory.glob("*.bin"))
    has_txt = bool(_list_txt_files(directory, required=False))
    if has_shards and has_txt:
        raise DataError(
            f"data directory {directory} contains both .txt files and .bin shards; "
            f"choose one with 'txt:{directory}' or 'shards:{directory}'"
        )
    if has_shards:
        return "shards"
    if has_txt:
        return "txt"
    if any(directory.iterdir()):
        raise DataError(
            f"data directory {directory} contains no .txt files and no *_train_*.bin or *_val_*.bin "
            "shards; add training data or point --data at another directory"
        )
    raise DataError(f"data directory {directory} is empty; add .txt files or .bin shards")


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


def load_corpus(data: str, cache_dir: str | os.PathLike) -> Corpus:
    """Open the data named by a cell's ``data`` string.

    Byte-level sources are built once and cached in ``cache_dir`` as a raw
    UTF-8 file named by its content hash, written atomically (temporary file
    plus rename), so jobs that start together on one node never read a
    half-written file. A small JSON index keyed by the source (Python build
    for the embedded corpus, file names, sizes and modification times for a
    txt directory) lets a later load skip the build. Both splits are
    memory-mapped. Shards need no cache because they are memory-mapped in place.

    Call this before starting threads that write to stdout or stderr, because
    building the embedded corpus skips any C module that prints while imported.

    Raises
    ------
    DataError
        When the data is missing, empty or malformed.
    """
    kind, directory, tokenizer = parse_data(data)
    if kind == "shards":
        corpus = _load_shards(directory, tokenizer)
        if data in DATASETS:
            _check_dataset_vocab(data, tokenizer, corpus.vocab_size)
        return corpus

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if kind == STDLIB_DOCS:
        source_key = _stdlib_source_key()
        text_path, fingerprint = _cached_text(
            cache, "stdlib-docs", source_key, lambda temp: _write_bytes(temp, build_stdlib_text())
        )
        description = f"stdlib-docs (Python {sys.version.split()[0]} documentation)"
    else:
        paths = _list_txt_files(directory)
        source_key = _txt_source_key(directory, paths)
        text_path, fingerprint = _cached_text(
            cache, "txt", source_key, lambda temp: _write_txt_files(temp, directory, paths)
        )
        description = f"txt:{directory} ({len(paths)} files)"
    return _byte_corpus(text_path, fingerprint, description)


def _byte_corpus(text_path: Path, fingerprint: str, description: str) -> Corpus:
    n_bytes = text_path.stat().st_size
    n_val = math.ceil(n_bytes * VAL_FRACTION)
    split = n_bytes - n_val
    if n_val < 2 or split < 2:
        # Two validation bytes make one (input, target) pair.
        min_bytes = math.floor(1 / VAL_FRACTION) + 1
        raise DataError(
            f"text in {text_path} has {n_bytes} bytes, too short to split into training and "
            f"validation; give at least {min_bytes} bytes of text"
        )
    tokens = np.memmap(text_path, dtype=np.uint8, mode="r")
    return Corpus(
        train=tokens[:split],
        val=tokens[split:],
        vocab_size=BYTE_VOCAB_SIZE,
        bytes_per_token=None,
        fingerprint=fingerprint,
        description=(
            f"{description}: {n_bytes:,} bytes, {split:,} train / {n_val:,} val, "
            f"byte-level vocabulary {BYTE_VOCAB_SIZE}"
        ),
    )


# ---------------------------------------------------------------------------
# Byte-level cache
# ---------------------------------------------------------------------------


def _cached_text(
    cache: Path, prefix: str, source_key: str, write_text: Callable[[Path], None]
) -> tuple[Path, str]:
    """Return the cached text file and its fingerprint, building it on a miss.

    ``write_text(path)`` writes the text to ``path``. The text file is named by
    its content hash, and the index that maps the source key to it is written
    after the text, so an index never points at a partial file.
    """
    index_path = cache / f"{prefix}-{source_key}.json"
    cached = _read_index(index_path, cache)
    if cached is not None:
        log.info("using cached %s corpus %s", prefix, cached[0])
        return cached

    started = time.perf_counter()
    temp_path = _temporary_path(cache)
    try:
        write_text(temp_path)
        fingerprint = _hash_file(temp_path)
        text_path = cache / f"text-{fingerprint}.bin"
        os.replace(temp_path, text_path)
    finally:
        temp_path.unlink(missing_ok=True)

    index = {"fingerprint": fingerprint, "file": text_path.name, "n_bytes": text_path.stat().st_size}
    _write_bytes_atomically(index_path, json.dumps(index, indent=1).encode())
    log.info(
        "built %s corpus %s (%d bytes) in %.2f s",
        prefix,
        text_path,
        index["n_bytes"],
        time.perf_counter() - started,
    )
    return text_path, fingerprint


def _read_index(index_path: Path, cache: Path) -> tuple[Path, str] | None:
    try:
        index = json.loads(index_path.read_text())
        text_path = cache / index["file"]
        matches = text_path.stat().st_size == index["n_bytes"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("ignoring unreadable corpus cache index %s (%s); rebuilding", index_path, error)
        return None
    if not matches:
        log.warning("cached corpus %s has the wrong size; rebuilding", text_path)
        return None
    return text_path, str(index["fingerprint"])


def _temporary_path(directory: Path) -> Path:
    handle, name = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    os.close(handle)
    # mkstemp creates the file readable by its owner only, but a cache
    # directory may be shared by a group.
    os.chmod(name, 0o644)
    return Path(name)


def _write_bytes(path: Path, content: bytes) -> None:
    with open(path, "wb") as file:
        file.write(content)
        file.flush()
        os.fsync(file.fileno())


def _write_bytes_atomically(path: Path, content: bytes) -> None:
    temp_path = _temporary_path(path.parent)
    try:
        _write_bytes(temp_path, content)
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _hash_json(parts: Sequence[Any]) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# The embedded corpus: standard library documentation
# ---------------------------------------------------------------------------

# Top-level modules left out: test suites, GUI and demo code, modules that act
# when imported (open a browser, print, change the terminal), and distutils,
# which setuptools replaces with its own copy.
STDLIB_SKIP = frozenset(
    {
        "__main__",
        "antigravity",
        "distutils",
        "ensurepip",
        "idlelib",
        "lib2to3",
        "pydoc_data",  # added separately as the pydoc topics
        "readline",
        "rlcompleter",
        "site",
        "test",
        "this",
        "tkinter",
        "turtle",
        "turtledemo",
        "venv",
    }
)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def build_stdlib_text(max_bytes: int = STDLIB_MAX_BYTES) -> bytes:
    """Build the embedded corpus as UTF-8 text of at most ``max_bytes`` bytes.

    The documents are the pydoc topics and the docstrings of the public
    standard library modules and of the public classes, functions and methods
    (dunder methods included) that they define. Modules written in Python are
    parsed with ``ast`` instead of imported, so no module code runs and
    monkeypatching by libraries already imported (torch replaces
    ``inspect.getfile``, for one) cannot change the text. Modules without
    Python source (``builtins``, ``sys``, ``math`` and other C modules) are
    imported. Repeated docstrings are kept once. Each document is its
    qualified name on one line, then the cleaned docstring and a blank line.

    Documents are ordered by the SHA-256 of their name, which is a fixed
    shuffle, so the validation split at the end mixes all modules instead of
    holding only the last ones in alphabetical order. Documents are added in
    that order until the next would pass ``max_bytes``.

    Raises
    ------
    DataError
        When Python runs with ``-OO``, which strips the docstrings of C modules
        and the pydoc topics.
    """
    if sys.flags.optimize >= 2:
        raise DataError(
            "Python runs with -OO (or PYTHONOPTIMIZE=2), which strips the docstrings that form "
            f"the {STDLIB_DOCS!r} corpus; run without -OO or use txt:DIR data"
        )
    source_files, compiled_modules = _find_stdlib_modules()
    documents: dict[str, str] = {}  # docstring -> name, so each text is kept once
    for name, text in _pydoc_topics():
        documents.setdefault(text, name)
    for module_name, path in source_files:
        for name, text in _source_docstrings(module_name, path):
            documents.setdefault(text, name)
    for module_name in compiled_modules:
        for name, text in _module_docstrings(module_name):
            documents.setdefault(text, name)

    ordered = sorted(documents.items(), key=lambda item: hashlib.sha256(item[1].encode()).digest())
    chunks = []
    total = 0
    for text, name in ordered:
        chunk = f"{name}\n{text}\n\n".encode()
        if total + len(chunk) > max_bytes:
            break
        chunks.append(chunk)
        total += len(chunk)
    if total < 1_000_000:
        log.warning("the stdlib-docs corpus has only %d bytes; expected at least 1 MB", total)
    return b"".join(chunks)


def _pydoc_topics() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        log.warning("pydoc_data is not installed; the stdlib-docs corpus has docstrings only")
        return []
    return [(f"topic {key}", _clean(text)) for key, text in sorted(topics.items()) if text.strip()]


def _find_stdlib_modules() -> tuple[list[tuple[str, Path]], list[str]]:
    """Find the public standard library modules without importing them.

    Returns (module name, source file) for modules written in Python,
    packages walked depth first in name order, and the names of the modules
    that have no source file (built into the interpreter or compiled
    extensions). Names with a leading underscore, test packages, modules not
    installed on this platform (``winreg``) and modules found outside the
    standard library directories are left out.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    source_files: list[tuple[str, Path]] = []
    compiled_modules: list[str] = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in STDLIB_SKIP:
            continue
        package = stdlib / name / "__init__.py"
        module = stdlib / f"{name}.py"
        # Frozen modules (os, io, codecs) report origin "frozen", so look for
        # the source file in the standard library directory first.
        if package.is_file():
            source_files.append((name, package))
            _add_package_modules(name, package.parent, source_files)
        elif module.is_file():
            source_files.append((name, module))
        else:
            spec = importlib.util.find_spec(name)
            if spec is not None and _in_stdlib(spec.origin):
                compiled_modules.append(name)
    return source_files, compiled_modules


def _add_package_modules(package: str, directory: Path, source_files: list[tuple[str, Path]]) -> None:
    for info in sorted(pkgutil.iter_modules([str(directory)]), key=lambda info: info.name):
        if info.name.startswith("_") or info.name in ("test", "tests"):
            continue
        name = f"{package}.{info.name}"
        if info.ispkg:
            init = directory / info.name / "__init__.py"
            if init.is_file():
                source_files.append((name, init))
                _add_package_modules(name, init.parent, source_files)
        elif (directory / f"{info.name}.py").is_file():
            source_files.append((name, directory / f"{info.name}.py"))


def _source_docstrings(module_name: str, path: Path) -> list[tuple[str, str]]:
    """Return (qualified name, docstring) for a source file and the definitions in it, in file order."""
    try:
        with warnings.catch_warnings():
            # Old escape sequences in some modules raise SyntaxWarning or DeprecationWarning.
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError) as error:
        log.warning("stdlib-docs skipped %s: %s", path, error)
        return []
    found = []
    docstring = ast.get_docstring(tree)
    if docstring:
        found.append((module_name, _clean(docstring)))
    _collect_definitions(module_name, tree.body, in_class=False, depth=0, found=found)
    return found


def _collect_definitions(
    prefix: str, body: list[ast.stmt], in_class: bool, depth: int, found: list[tuple[str, str]]
) -> None:
    for node in body:
        if isinstance(node, (ast.If, ast.Try)):
            # Platform and fallback branches define public names too.
            branches = [node.body, node.orelse]
            if isinstance(node, ast.Try):
                branches += [handler.body for handler in node.handlers] + [node.finalbody]
            for branch in branches:
                _collect_definitions(prefix, branch, in_class, depth, found)
            continue
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        is_dunder = node.name.startswith("__") and node.name.endswith("__")
        if node.name.startswith("_") and not (in_class and is_dunder):
            continue
        name = f"{prefix}.{node.name}"
        docstring = ast.get_docstring(node)
        if docstring:
            found.append((name, _clean(docstring)))
        if isinstance(node, ast.ClassDef) and depth < 2:
            _collect_definitions(name, node.body, in_class=True, depth=depth + 1, found=found)


def _module_docstrings(module_name: str) -> list[tuple[str, str]]:
    """Import a module that has no source file and return its docstrings, in name order.

    The module is skipped when its import raises or writes to stdout or stderr.
    """
    output = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        warnings.simplefilter("ignore")
        try:
            module = importlib.import_module(module_name)
        except (KeyboardInterrupt, MemoryError):
            raise
        except BaseException as error:  # noqa: BLE001 - an import may raise anything, SystemExit included
            log.debug("stdlib-docs skipped %s: %r", module_name, error)
            return []
    if output.getvalue():
        log.debug("stdlib-docs skipped %s because it printed while imported", module_name)
        return []

    found = []
    _append_docstring(found, module_name, module)
    for name, value in sorted(vars(module).items()):
        if name.startswith("_"):
            continue
        if getattr(value, "__module__", None) != module_name:
            # sys keeps the original of each hook that programs replace
            # (pytest replaces sys.unraisablehook) as sys.__<name>__.
            value = vars(module).get(f"__{name}__", value)
        # Objects from another module are aliases, or replacements that a
        # library installed, so they are left out.
        # NOTE: a library that replaces a C function without keeping the
        # original (gevent patches select.select) removes its docstring and
        # so changes the fingerprint.
        if getattr(value, "__module__", None) != module_name:
            continue
        qualified = f"{module_name}.{name}"
        if inspect.isroutine(value):
            _append_docstring(found, qualified, value)
        elif inspect.isclass(value):
            _append_docstring(found, qualified, value)
            for member_name, member in sorted(vars(value).items()):
                is_dunder = member_name.startswith("__") and member_name.endswith("__")
                if member_name == "__doc__" or (member_name.startswith("_") and not is_dunder):
                    continue
                if inspect.isroutine(member) or inspect.isdatadescriptor(member):
                    _append_docstring(found, f"{qualified}.{member_name}", member)
    return found


def _append_docstring(found: list[tuple[str, str]], name: str, obj: Any) -> None:
    docstring = getattr(obj, "__doc__", None)
    if isinstance(docstring, str) and docstring.strip():
        found.append((name, _clean(docstring)))


def _clean(text: str) -> str:
    # Generated docstrings can contain object addresses, which would change
    # the text, and so the fingerprint, from one process to the next.
    return _ADDRESS.sub("", inspect.cleandoc(text))


def _in_stdlib(origin: str | None) -> bool:
    if origin in ("built-in", "frozen"):
        return True
    if origin is None:
        return False
    real = os.path.realpath(origin)
    if "site-packages" in real or "dist-packages" in real:
        return False
    paths = sysconfig.get_paths()
    roots = tuple(os.path.realpath(paths[key]) + os.sep for key in ("stdlib", "platstdlib"))
    return real.startswith(roots)


def _stdlib_source_key() -> str:
    paths = sysconfig.get_paths()
    return _hash_json(
        [
            STDLIB_BUILDER_VERSION,
            STDLIB_MAX_BYTES,
            sys.version,
            sys.platform,
            sys.implementation.cache_tag,
            sys.flags.optimize,
            paths["stdlib"],
            paths["platstdlib"],
        ]
    )


# ---------------------------------------------------------------------------
# Directories of .txt files
# ---------------------------------------------------------------------------


def _list_txt_files(directory: Path, required: bool = True) -> list[Path]:
    """List the ``.txt`` files under ``directory``, recursively, sorted by relative path.

    Hidden files and directories (names starting with ".") are skipped, and
    symbolic links to directories are not followed. With ``required``, raise
    DataError when the directory is missing or has no non-empty ``.txt`` file.
    """
    if required:
        _require_directory(directory)
    paths = []
    for root, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        for name in filenames:
            if name.endswith(".txt") and not name.startswith("."):
                paths.append(Path(root) / name)
    paths.sort(key=lambda path: path.relative_to(directory).as_posix())
    if not required:
        return paths
    if not paths:
        if any(directory.iterdir()):
            raise DataError(f"data directory {directory} contains no .txt files; add some or choose another directory")
        raise DataError(f"data directory {directory} is empty; add .txt files or choose another directory")
    if all(path.stat().st_size == 0 for path in paths):
        raise DataError(f"all {len(paths)} .txt files in {directory} are empty; add text to them")
    return paths


def _txt_source_key(directory: Path, paths: list[Path]) -> str:
    # NOTE: a file edited without changing its size or modification time
    # keeps the old cache entry.
    entries = []
    for path in paths:
        stat = path.stat()
        entries.append([path.relative_to(directory).as_posix(), stat.st_size, stat.st_mtime_ns])
    return _hash_json([str(directory), entries])


def _write_txt_files(target: Path, directory: Path, paths: list[Path]) -> None:
    """Write the files to ``target`` joined by a blank line, checking that each is UTF-8."""
    with open(target, "wb") as output:
        for number, path in enumerate(paths):
            if number:
                output.write(b"\n\n")
            decoder = codecs.getincrementaldecoder("utf-8")()
            offset = 0
            with open(path, "rb") as file:
                for block in iter(lambda: file.read(1 << 20), b""):
                    try:
                        decoder.decode(block)
                    except UnicodeDecodeError as error:
                        raise DataError(
                            f"{path} is not valid UTF-8 (byte {offset + error.start}); convert it to "
                            f"UTF-8 or move it out of {directory}"
                        ) from None
                    output.write(block)
                    offset += len(block)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise DataError(
                    f"{path} ends inside a UTF-8 character; convert it to UTF-8 or move it out of {directory}"
                ) from None
        output.flush()
        os.fsync(output.fileno())


# ---------------------------------------------------------------------------
# Pre-tokenised shards
# ---------------------------------------------------------------------------


def _is_shard_name(name: str) -> bool:
    return name.endswith(".bin") and ("_train_" in name or "_val_" in name)


def _list_shards(directory: Path) -> tuple[list[Path], list[Path]]:
    _require_directory(directory)
    train = sorted(directory.glob("*_train_*.bin"))
    val = sorted(directory.glob("*_val_*.bin"))
    if not train and not val:
        raise DataError(
            f"shard directory {directory} contains no *_train_*.bin or *_val_*.bin files; "
            "check the path or use txt:DIR for text"
        )
    if not train:
        raise DataError(f"shard directory {directory} has validation shards but no *_train_*.bin shard; add one")
    if not val:
        raise DataError(f"shard directory {directory} has training shards but no *_val_*.bin shard; add one")
    return train, val


def read_shard_header(path: str | os.PathLike) -> int:
    """Check a shard's header and size and return its token count.

    The header is 256 little-endian int32: magic 20240520, version 1 and the
    token count, then unused values. The tokens follow as little-endian
    uint16, so the file has exactly ``1024 + 2 * count`` bytes.

    Raises
    ------
    DataError
        On a truncated file, a wrong magic number or version, or a size that
        does not match the token count.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        raise DataError(
            f"shard {path} is truncated: {size} bytes, shorter than the {SHARD_HEADER_BYTES}-byte "
            "header; copy or regenerate the shard"
        )
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    magic, version, count = (int(value) for value in header[:3])
    if magic != SHARD_MAGIC:
        raise DataError(
            f"shard {path} has magic number {magic}, expected {SHARD_MAGIC}; "
            "it is not a modded-nanogpt token shard"
        )
    if version != SHARD_VERSION:
        raise DataError(f"shard {path} has format version {version}, expected {SHARD_VERSION}")
    expected = SHARD_HEADER_BYTES + count * SHARD_TOKEN_DTYPE.itemsize
    if count <= 0:
        raise DataError(f"shard {path} has token count {count} in its header; it contains no tokens")
    if size != expected:
        problem = "truncated" if size < expected else "longer than its header says"
        raise DataError(
            f"shard {path} is {problem}: the header gives {count} tokens, which need {expected} bytes, "
            f"but the file has {size}; copy or regenerate the shard"
        )
    return count


def _check_shards(directory: Path, tokenizer: Path | None) -> tuple[int, Path]:
    """Check a shard directory cheaply; return the tokenizer's vocabulary size and path."""
    train_paths, val_paths = _list_shards(directory)
    model_path = _find_tokenizer(directory, tokenizer)
    vocab_size = _load_tokenizer(model_path).get_piece_size()
    for path in train_paths + val_paths:
        _check_token_sample(path, _open_shard(path), vocab_size, model_path)
    return vocab_size, model_path


def _open_shard(path: Path) -> np.memmap:
    count = read_shard_header(path)
    return np.memmap(path, dtype=SHARD_TOKEN_DTYPE, mode="r", offset=SHARD_HEADER_BYTES, shape=(count,))


def _sample_ranges(count: int) -> list[tuple[int, int]]:
    middle = max(0, count // 2 - SHARD_SAMPLE_TOKENS // 2)
    starts = sorted({0, middle, max(0, count - SHARD_SAMPLE_TOKENS)})
    return [(start, min(count, start + SHARD_SAMPLE_TOKENS)) for start in starts]


def _check_token_sample(path: Path, tokens: np.ndarray, vocab_size: int, model_path: Path) -> None:
    for start, stop in _sample_ranges(len(tokens)):
        largest = int(tokens[start:stop].max())
        if largest >= vocab_size:
            raise DataError(
                f"shard {path} contains token id {largest} (near position {start}), but the tokenizer "
                f"{model_path} has only {vocab_size} ids; use the tokenizer that made the shards"
            )


def _find_tokenizer(directory: Path, tokenizer: Path | None) -> Path:
    if tokenizer is not None:
        if not tokenizer.is_file():
            raise DataError(f"tokenizer model {tokenizer} not found; check the path")
        return tokenizer
    models = sorted(directory.glob("*.model"))
    if len(models) == 1:
        return models[0]
    if not models:
        raise DataError(
            f"no SentencePiece tokenizer (.model file) found in {directory}; copy it there or give "
            f"'shards:{directory}{TOKENIZER_SEPARATOR}/path/to/tokenizer.model'"
        )
    names = ", ".join(model.name for model in models)
    raise DataError(
        f"several tokenizer models in {directory} ({names}); choose one with "
        f"'shards:{directory}{TOKENIZER_SEPARATOR}/path/to/tokenizer.model'"
    )


def _load_tokenizer(model_path: Path) -> Any:
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(model_path))
    except (OSError, RuntimeError) as error:
        raise DataError(f"tokenizer {model_path} is not a valid SentencePiece model ({error})") from None
    return processor


def sentencepiece_bytes_per_token(processor: Any) -> np.ndarray:
    """Return the UTF-8 byte length of every token id of a SentencePiece model.

    The rule: control and unknown pieces (``<s>``, ``</s>``, ``<unk>``) and
    unused pieces count 0 bytes. Byte-fallback pieces (``<0x41>``) count 1.
    Other pieces count the UTF-8 length of their text, with each leading-space
    marker U+2581 counted as the one byte of a space.

    NOTE: a model trained with ``add_dummy_prefix`` (the SentencePiece default)
    adds a space marker before each encoded text, which this rule counts as a
    byte although the text does not contain it. That adds one byte per
    document, so bits per byte come out slightly low on such data.
    """
    counts = np.zeros(processor.get_piece_size(), dtype=np.float64)
    for token_id in range(len(counts)):
        if processor.is_control(token_id) or processor.is_unknown(token_id) or processor.is_unused(token_id):
            continue
        if processor.is_byte(token_id):
            counts[token_id] = 1
            continue
        piece = processor.id_to_piece(token_id).replace(SPACE_MARKER, " ")
        counts[token_id] = len(piece.encode("utf-8"))
    return counts


def _load_shards(directory: Path, tokenizer: Path | None) -> Corpus:
    train_paths, val_paths = _list_shards(directory)
    model_path = _find_tokenizer(directory, tokenizer)
    processor = _load_tokenizer(model_path)
    vocab_size = processor.get_piece_size()

    digest = hashlib.sha256(model_path.read_bytes())
    opened = {}
    for path in train_paths + val_paths:
        tokens = _open_shard(path)
        _check_token_sample(path, tokens, vocab_size, model_path)
        # Hashing every token of a multi-gigabyte data set would cost each job
        # seconds to minutes, so the fingerprint covers names, sizes and the
        # sampled blocks, which is enough to tell data sets apart.
        digest.update(f"{path.name}:{len(tokens)}".encode())
        for start, stop in _sample_ranges(len(tokens)):
            digest.update(np.ascontiguousarray(tokens[start:stop]).tobytes())
        opened[path] = tokens

    train = _join_shards([opened[path] for path in train_paths])
    val = _join_shards([opened[path] for path in val_paths])
    return Corpus(
        train=train,
        val=val,
        vocab_size=vocab_size,
        bytes_per_token=sentencepiece_bytes_per_token(processor),
        fingerprint=digest.hexdigest()[:16],
        description=(
            f"shards:{directory}: {len(train):,} train tokens in {len(train_paths)} shards, "
            f"{len(val):,} val tokens in {len(val_paths)} shards, "
            f"SentencePiece vocabulary {vocab_size} ({model_path.name})"
        ),
    )


def _join_shards(parts: list[np.ndarray]) -> TokenArray:
    return parts[0] if len(parts) == 1 else ShardedTokens(parts)


# ---------------------------------------------------------------------------
# Batches and bits per byte
# ---------------------------------------------------------------------------


def get_batch(
    tokens: TokenArray,
    batch_size: int,
    seq_len: int,
    seed: int,
    step: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a training batch at random offsets determined by (seed, step) alone.

    The generator is ``np.random.default_rng([seed, step])``, so a resumed run
    gets the same batches, and cells that share a seed train on the same data
    at each step whatever their other settings.

    Returns
    -------
    x, y
        int64 tensors of shape (batch_size, seq_len) on ``device``, where
        ``y[:, t]`` is the token after ``x[:, t]``. On CUDA the copies use
        pinned memory and do not block.
    """
    import torch

    _check_shape(batch_size, seq_len)
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be non-negative, got seed={seed} and step={step}")
    n_tokens = len(tokens)
    if n_tokens < seq_len + 1:
        raise DataError(f"the split has {n_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}; lower seq_len")

    rng = np.random.default_rng([seed, step])
    offsets = rng.integers(0, n_tokens - seq_len, size=batch_size)
    windows = np.stack([tokens[offset : offset + seq_len + 1] for offset in offsets])
    return _to_device(windows.astype(np.int64), torch.device(device))


class ValBatches(Sequence):
    """Fixed validation batches: contiguous, non-overlapping windows from the start of the split.

    Item ``i`` is ``(x, y)``, int64 tensors of shape (rows, seq_len) where
    rows is ``batch_size`` except possibly in the last batch.
    """

    def __init__(self, tokens: TokenArray, batch_size: int, seq_len: int, n_windows: int, device: Any) -> None:
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.n_windows = n_windows
        self.device = device

    @property
    def n_targets(self) -> int:
        """Number of target tokens over all batches."""
        return self.n_windows * self.seq_len

    def __len__(self) -> int:
        return math.ceil(self.n_windows / self.batch_size)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"validation batch {index} out of range for {len(self)} batches")
        first = index * self.batch_size
        rows = min(self.batch_size, self.n_windows - first)
        start = first * self.seq_len
        span = np.asarray(self.tokens[start : start + rows * self.seq_len + 1], dtype=np.int64)
        # Window r is span[r*T : r*T + T + 1]; neighbouring windows share only
        # the token that is the last target of one and the first input of the next.
        inputs = span[:-1].reshape(rows, self.seq_len)
        targets = span[1:].reshape(rows, self.seq_len)
        return _to_device_pair(inputs, targets, self.device)


def val_batches(
    corpus: Corpus,
    batch_size: int,
    seq_len: int,
    val_tokens: int,
    device: torch.device | str = "cpu",
) -> ValBatches:
    """Return fixed batches covering the first ``val_tokens`` tokens of the validation split.

    The batches hold ``min(val_tokens, len(corpus.val) - 1) // seq_len``
    contiguous, non-overlapping windows of ``seq_len`` inputs each, so they
    cover fewer than ``val_tokens`` tokens when the split is shorter or
    ``val_tokens`` is not a multiple of ``seq_len``. ``n_targets`` gives the
    number covered. The same arguments always give the same batches.

    Raises
    ------
    DataError
        When the validation split is shorter than ``seq_len + 1`` tokens.
    """
    import torch

    _check_shape(batch_size, seq_len)
    if val_tokens < seq_len:
        raise ValueError(f"val_tokens {val_tokens} is smaller than seq_len {seq_len}; raise val_tokens")
    n_val = len(corpus.val)
    n_windows = min(val_tokens, n_val - 1) // seq_len
    if n_windows < 1:
        raise DataError(
            f"the validation split of {corpus.description} has {n_val} tokens, fewer than "
            f"seq_len + 1 = {seq_len + 1}; lower seq_len or add data"
        )
    if n_windows * seq_len < val_tokens:
        log.info("validation covers %d tokens, fewer than val_tokens=%d", n_windows * seq_len, val_tokens)
    return ValBatches(corpus.val, batch_size, seq_len, n_windows, torch.device(device))


def count_bytes(y_tokens: np.ndarray | torch.Tensor, corpus: Corpus) -> float:
    """Count the bytes of UTF-8 text that the target tokens encode."""
    targets = _as_numpy(y_tokens)
    if corpus.bytes_per_token is None:
        return float(targets.size)
    return float(corpus.bytes_per_token[targets.reshape(-1)].sum())


def bits_per_byte(loss_sum_nats: float, y_tokens: np.ndarray | torch.Tensor, corpus: Corpus) -> float:
    """Convert a summed cross-entropy to bits per byte of text.

    ``loss_sum_nats`` is the cross-entropy in nats summed over every token in
    ``y_tokens``. The result is ``loss_sum_nats / ln 2 / bytes``, where bytes
    is the UTF-8 length of the targets: one per token for byte-level data (so
    it equals mean loss / ln 2), and the sum of ``corpus.bytes_per_token``
    for SentencePiece data.
    """
    n_bytes = count_bytes(y_tokens, corpus)
    if n_bytes <= 0:
        raise ValueError(
            f"the {np.size(_as_numpy(y_tokens))} target tokens encode 0 bytes of text, "
            "so bits per byte is undefined; evaluate on more tokens"
        )
    return float(loss_sum_nats) / math.log(2) / n_bytes


def _check_shape(batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be at least 1, got {batch_size} and {seq_len}")


def _as_numpy(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if hasattr(values, "detach"):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _to_device(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return _to_device_pair(windows[:, :-1], windows[:, 1:], device)


def _to_device_pair(
    inputs: np.ndarray, targets: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    # Contiguous copies, so callers may call .view() on the results.
    x = torch.from_numpy(np.ascontiguousarray(inputs))
    y = torch.from_numpy(np.ascontiguousarray(targets))
    # NOTE: the CUDA branch has not run on a GPU yet; its test skips on CPU-only machines.
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
