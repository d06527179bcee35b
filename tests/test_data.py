"""Tests for jobs.data: corpora, the byte-level cache, shards, batches and bits per byte."""

from __future__ import annotations

import concurrent.futures
import hashlib
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch

from jobs import data
from jobs.data import DataError

CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------
# helpers and fixtures
# ---------------------------------------------------------------------------


def write_shard(path: Path, tokens, magic: int = 20240520, version: int = 1, count: int | None = None) -> Path:
    """Write a token shard by hand from the format description, independent of jobs.data."""
    header = np.zeros(256, dtype="<i4")
    header[0] = magic
    header[1] = version
    header[2] = len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return path


TOKENIZER_TEXT = (
    "the quick brown fox jumps over the lazy dog\n"
    "a cell is one training run of the study\n"
    "warmdown is the fraction of steps spent decaying the learning rate\n"
) * 40


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> Path:
    """Train a 300-piece BPE SentencePiece model with byte fallback on a small text."""
    directory = tmp_path_factory.mktemp("tokenizer")
    text_path = directory / "train.txt"
    text_path.write_text(TOKENIZER_TEXT)
    sentencepiece.SentencePieceTrainer.train(
        input=str(text_path),
        model_prefix=str(directory / "tiny"),
        vocab_size=300,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        # Identity normalisation and no dummy prefix keep the decoded text
        # equal to the input, so byte counts can be compared exactly.
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return directory / "tiny.model"


@pytest.fixture(scope="module")
def stdlib_corpus(tmp_path_factory) -> tuple[data.Corpus, Path]:
    cache = tmp_path_factory.mktemp("cache")
    return data.load_corpus("stdlib-docs", cache), cache


@pytest.fixture
def shard_dir(tmp_path: Path, tokenizer_model: Path) -> Path:
    """A shard directory with two training shards, one validation shard and the tokenizer."""
    directory = tmp_path / "shards"
    directory.mkdir()
    write_shard(directory / "fineweb_train_000001.bin", np.arange(0, 1000) % 300)
    write_shard(directory / "fineweb_train_000002.bin", np.arange(1000, 1500) % 300)
    write_shard(directory / "fineweb_val_000000.bin", np.arange(7, 407) % 300)
    (directory / "tiny.model").write_bytes(tokenizer_model.read_bytes())
    return directory


def positions(n: int) -> np.ndarray:
    """Tokens whose value is their own position, so a window shows where it came from."""
    return np.arange(n, dtype=np.int64).astype(np.uint16)


# ---------------------------------------------------------------------------
# the embedded corpus
# ---------------------------------------------------------------------------


def test_stdlib_corpus_is_english_text(stdlib_corpus):
    corpus, _ = stdlib_corpus
    text = np.concatenate([corpus.train, corpus.val]).tobytes().decode("utf-8")

    assert len(text.encode()) >= 1_000_000
    assert len(text.encode()) <= data.STDLIB_MAX_BYTES
    assert corpus.vocab_size == 256
    assert corpus.bytes_per_token is None
    assert corpus.train.dtype == np.uint8
    assert isinstance(corpus.train, np.memmap)
    words = text.split()
    # "the" is 5.8% of the words in the CPython 3.11.7 corpus; the bound leaves room.
    assert words.count("the") / len(words) > 0.02
    assert "Return" in text
    assert sum(ch.isascii() for ch in text) / len(text) > 0.99


def test_stdlib_corpus_split_is_tail(stdlib_corpus):
    corpus, cache = stdlib_corpus
    cached = (cache / f"text-{corpus.fingerprint}.bin").read_bytes()
    n_val = len(corpus.val)

    assert len(corpus.train) + n_val == len(cached)
    assert n_val == math.ceil(len(cached) * data.VAL_FRACTION)
    assert corpus.train.tobytes() == cached[:-n_val]
    assert corpus.val.tobytes() == cached[-n_val:]


def test_stdlib_corpus_is_deterministic(stdlib_corpus):
    corpus, _ = stdlib_corpus
    rebuilt = data.build_stdlib_text()

    assert hashlib.sha256(rebuilt).hexdigest()[:16] == corpus.fingerprint


def test_stdlib_corpus_same_in_fresh_interpreter(stdlib_corpus):
    # pytest and torch both replace standard library functions, so a fresh
    # interpreter that imports torch first must still build the same text.
    corpus, _ = stdlib_corpus
    script = (
        "import hashlib, torch\n"
        "from jobs.data import build_stdlib_text\n"
        "print(hashlib.sha256(build_stdlib_text()).hexdigest()[:16])\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == corpus.fingerprint


def test_stdlib_modules_leave_out_side_effect_modules():
    source_files, compiled_modules = data._find_stdlib_modules()
    top_level = {name.split(".")[0] for name, _ in source_files} | set(compiled_modules)
    all_names = [name for name, _ in source_files] + compiled_modules

    for skipped in ("antigravity", "this", "idlelib", "tkinter", "turtle", "test", "readline", "__main__"):
        assert skipped not in top_level
    assert not [name for name in all_names if name.endswith((".__main__", ".test", ".tests"))]
    assert {"json", "email.mime.text", "builtins", "sys", "math"} <= set(all_names)
    assert "winreg" not in compiled_modules


def test_stdlib_corpus_bounded():
    text = data.build_stdlib_text(max_bytes=50_000)

    assert 40_000 < len(text) <= 50_000
    assert text.endswith(b"\n\n")  # cut between documents, never inside one


def test_stdlib_corpus_rejects_optimize_2(monkeypatch):
    class Flags:
        optimize = 2

    monkeypatch.setattr(data.sys, "flags", Flags())
    with pytest.raises(DataError, match="-OO"):
        data.build_stdlib_text()


# ---------------------------------------------------------------------------
# the byte-level cache
# ---------------------------------------------------------------------------


def test_cache_reused_without_rebuild(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "build_stdlib_text", lambda: b"The cache holds this text. " * 40)
    first = data.load_corpus("stdlib-docs", tmp_path)
    text_file = tmp_path / f"text-{first.fingerprint}.bin"
    built_at = text_file.stat().st_mtime_ns

    def fail():
        raise AssertionError("the corpus was rebuilt although it is cached")

    monkeypatch.setattr(data, "build_stdlib_text", fail)
    second = data.load_corpus("stdlib-docs", tmp_path)

    assert second.fingerprint == first.fingerprint
    assert text_file.stat().st_mtime_ns == built_at
    assert second.val.tobytes() == first.val.tobytes()


def test_cache_leaves_no_temporary_files(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "build_stdlib_text", lambda: b"Some text for the cache. " * 40)
    data.load_corpus("stdlib-docs", tmp_path)

    names = sorted(path.name for path in tmp_path.iterdir())
    assert len(names) == 2
    assert names[0].startswith("stdlib-docs-")
    assert names[0].endswith(".json")
    assert names[1].startswith("text-")
    assert names[1].endswith(".bin")


def test_cache_ignores_partial_temporary_file(tmp_path, monkeypatch):
    # A job killed while writing leaves a temporary file, which no index names.
    (tmp_path / ".tmp-abc.part").write_bytes(b"half a corp")
    monkeypatch.setattr(data, "build_stdlib_text", lambda: b"A complete text. " * 40)

    corpus = data.load_corpus("stdlib-docs", tmp_path)

    assert corpus.train.tobytes().startswith(b"A complete text.")


def test_cache_rebuilds_missing_text_file(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "build_stdlib_text", lambda: b"Text that will be deleted. " * 40)
    first = data.load_corpus("stdlib-docs", tmp_path)
    (tmp_path / f"text-{first.fingerprint}.bin").unlink()

    second = data.load_corpus("stdlib-docs", tmp_path)

    assert second.fingerprint == first.fingerprint
    assert len(second.train) == len(first.train)


def test_cache_rebuilds_corrupt_index(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "build_stdlib_text", lambda: b"Index test text. " * 40)
    first = data.load_corpus("stdlib-docs", tmp_path)
    index = next(tmp_path.glob("stdlib-docs-*.json"))
    index.write_text("{not json")

    second = data.load_corpus("stdlib-docs", tmp_path)

    assert second.fingerprint == first.fingerprint


def test_cache_concurrent_loads_agree(tmp_path, monkeypatch):
    text = b"Jobs that start together share one cache. " * 5000
    started = threading.Barrier(4)

    def slow_build():
        started.wait(timeout=10)  # every loader misses the cache and builds
        return text

    monkeypatch.setattr(data, "build_stdlib_text", slow_build)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        corpora = list(pool.map(lambda _: data.load_corpus("stdlib-docs", tmp_path), range(4)))

    for corpus in corpora:
        assert corpus.train.tobytes() + corpus.val.tobytes() == text
        assert corpus.fingerprint == corpora[0].fingerprint
    assert not list(tmp_path.glob(".tmp-*"))


def test_text_shorter_than_split_rejected(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "build_stdlib_text", lambda: b"too short")

    with pytest.raises(DataError, match="too short"):
        data.load_corpus("stdlib-docs", tmp_path)


# ---------------------------------------------------------------------------
# directories of .txt files
# ---------------------------------------------------------------------------


def test_txt_directory_loads_sorted_recursive(tmp_path):
    source = tmp_path / "texts"
    (source / "b_dir").mkdir(parents=True)
    (source / ".hidden").mkdir()
    (source / "b_dir" / "c.txt").write_text("third file " * 20)
    (source / "a.txt").write_text("first file " * 20)
    (source / "b.txt").write_text("second file with caf\u00e9 " * 20)
    (source / "notes.md").write_text("not a txt file")
    (source / ".hidden" / "x.txt").write_text("hidden")
    (source / ".skip.txt").write_text("hidden")

    corpus = data.load_corpus(f"txt:{source}", tmp_path / "cache")

    expected = b"\n\n".join(
        (source / name).read_bytes() for name in ("a.txt", "b.txt", "b_dir/c.txt")
    )
    assert corpus.train.tobytes() + corpus.val.tobytes() == expected
    assert corpus.vocab_size == 256
    assert corpus.fingerprint == hashlib.sha256(expected).hexdigest()[:16]
    assert "3 files" in corpus.description


def test_txt_cache_follows_file_changes(tmp_path):
    source = tmp_path / "texts"
    source.mkdir()
    (source / "a.txt").write_text("version one " * 20)
    first = data.load_corpus(f"txt:{source}", tmp_path / "cache")

    (source / "a.txt").write_text("version two, longer " * 20)
    second = data.load_corpus(f"txt:{source}", tmp_path / "cache")

    assert second.fingerprint != first.fingerprint
    assert second.train.tobytes().startswith(b"version two")


def test_txt_invalid_utf8_names_file(tmp_path):
    source = tmp_path / "texts"
    source.mkdir()
    (source / "good.txt").write_text("fine text " * 20)
    (source / "latin1.txt").write_bytes("caf\u00e9 ".encode("latin-1") * 20)

    with pytest.raises(DataError, match="latin1.txt is not valid UTF-8"):
        data.load_corpus(f"txt:{source}", tmp_path / "cache")
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_resolve_txt_directory(tmp_path, monkeypatch):
    source = tmp_path / "texts"
    source.mkdir()
    (source / "a.txt").write_text("some text")
    monkeypatch.chdir(tmp_path)

    assert data.resolve_data("texts") == f"txt:{source}"
    assert data.resolve_data("txt:texts") == f"txt:{source}"
    assert data.resolve_data(f"txt:{source}") == f"txt:{source}"


@pytest.mark.parametrize("spec_prefix", ["", "txt:"])
def test_missing_directory_rejected(tmp_path, spec_prefix):
    missing = tmp_path / "nowhere"

    with pytest.raises(DataError, match=f"{missing} not found"):
        data.resolve_data(spec_prefix + str(missing))
    with pytest.raises(DataError, match=f"{missing} not found"):
        data.load_corpus(f"txt:{missing}", tmp_path / "cache")


@pytest.mark.parametrize("spec_prefix", ["", "txt:"])
def test_empty_directory_rejected(tmp_path, spec_prefix):
    empty = tmp_path / "empty"
    empty.mkdir()

    with pytest.raises(DataError, match=f"{empty} is empty"):
        data.resolve_data(spec_prefix + str(empty))
    with pytest.raises(DataError, match=f"{empty} is empty"):
        data.load_corpus(f"txt:{empty}", tmp_path / "cache")


def test_directory_without_txt_rejected(tmp_path):
    source = tmp_path / "other"
    source.mkdir()
    (source / "notes.md").write_text("markdown")

    with pytest.raises(DataError, match=f"{source} contains no .txt files"):
        data.resolve_data(str(source))
    with pytest.raises(DataError, match=f"{source} contains no .txt files"):
        data.resolve_data(f"txt:{source}")


def test_empty_txt_files_rejected(tmp_path):
    source = tmp_path / "blank"
    source.mkdir()
    (source / "a.txt").write_text("")

    with pytest.raises(DataError, match=f"files in {source} are empty"):
        data.resolve_data(f"txt:{source}")


def test_file_instead_of_directory_rejected(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("text")

    with pytest.raises(DataError, match=f"{path} is not a directory"):
        data.resolve_data(str(path))


# ---------------------------------------------------------------------------
# resolve_data values
# ---------------------------------------------------------------------------


def test_resolve_stdlib_docs_unchanged():
    assert data.resolve_data("stdlib-docs") == "stdlib-docs"
    assert data.resolve_data("  stdlib-docs\n") == "stdlib-docs"


@pytest.mark.parametrize("spec", ["", "txt:", "shards:", "stdlib", "shards:?tokenizer=/x.model"])
def test_resolve_invalid_values(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so "stdlib" names no existing directory

    with pytest.raises(DataError):
        data.resolve_data(spec)


def test_resolve_tokenizer_needs_shards(tmp_path):
    with pytest.raises(DataError, match="only to shards"):
        data.resolve_data("stdlib-docs", tokenizer=tmp_path / "x.model")


def test_resolve_mixed_directory_rejected(tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("text")
    write_shard(mixed / "x_train_000000.bin", [1, 2, 3])

    with pytest.raises(DataError, match=f"shards:{mixed}"):
        data.resolve_data(str(mixed))


# ---------------------------------------------------------------------------
# shards
# ---------------------------------------------------------------------------


def test_shard_round_trip(shard_dir):
    assert data.resolve_data(str(shard_dir)) == f"shards:{shard_dir}"

    corpus = data.load_corpus(f"shards:{shard_dir}", shard_dir / "unused-cache")

    expected_train = np.concatenate([np.arange(0, 1000) % 300, np.arange(1000, 1500) % 300])
    assert corpus.vocab_size == 300
    assert len(corpus.train) == 1500
    assert isinstance(corpus.train, data.ShardedTokens)
    assert np.array_equal(corpus.train[0:1500], expected_train)
    assert np.array_equal(corpus.train[990:1010], expected_train[990:1010])  # crosses shards
    assert int(corpus.train[1200]) == expected_train[1200]
    assert int(corpus.train[-1]) == expected_train[-1]
    assert isinstance(corpus.val, np.memmap)
    assert corpus.val.dtype == np.uint16
    assert np.array_equal(corpus.val, np.arange(7, 407) % 300)
    assert corpus.bytes_per_token is not None
    assert corpus.bytes_per_token.shape == (300,)
    assert len(corpus.fingerprint) == 16
    assert not (shard_dir / "unused-cache").exists()


def test_shard_fingerprint_follows_content(shard_dir):
    first = data.load_corpus(f"shards:{shard_dir}", shard_dir)
    again = data.load_corpus(f"shards:{shard_dir}", shard_dir)
    write_shard(shard_dir / "fineweb_val_000000.bin", np.arange(8, 408) % 300)
    changed = data.load_corpus(f"shards:{shard_dir}", shard_dir)

    assert again.fingerprint == first.fingerprint
    assert changed.fingerprint != first.fingerprint


@pytest.mark.parametrize(
    "case, message",
    [
        ("bad magic", "magic number 20240521"),
        ("bad version", "format version 2"),
        ("count too large", "truncated: the header gives 120 tokens"),
        ("count too small", "longer than its header says"),
        ("truncated header", "shorter than the 1024-byte header"),
        ("no tokens", "token count 0"),
    ],
)
def test_malformed_shard_rejected(shard_dir, case, message):
    path = shard_dir / "fineweb_train_000001.bin"
    tokens = np.arange(100)
    if case == "bad magic":
        write_shard(path, tokens, magic=20240521)
    elif case == "bad version":
        write_shard(path, tokens, version=2)
    elif case == "count too large":
        write_shard(path, tokens, count=120)
    elif case == "count too small":
        write_shard(path, tokens, count=80)
    elif case == "truncated header":
        path.write_bytes(write_shard(path, tokens).read_bytes()[:500])
    elif case == "no tokens":
        write_shard(path, [])

    with pytest.raises(DataError, match=message) as error:
        data.read_shard_header(path)
    assert str(path) in str(error.value)
    with pytest.raises(DataError, match=message):
        data.resolve_data(f"shards:{shard_dir}")
    with pytest.raises(DataError, match=message):
        data.load_corpus(f"shards:{shard_dir}", shard_dir)


def test_shard_token_beyond_vocab_rejected(shard_dir):
    write_shard(shard_dir / "fineweb_val_000000.bin", [5, 6, 300, 7])

    with pytest.raises(DataError, match="token id 300"):
        data.resolve_data(str(shard_dir))
    with pytest.raises(DataError, match="token id 300"):
        data.load_corpus(f"shards:{shard_dir}", shard_dir)


def test_shard_missing_tokenizer_rejected(shard_dir):
    (shard_dir / "tiny.model").unlink()

    with pytest.raises(DataError, match=f"no SentencePiece tokenizer .* in {shard_dir}"):
        data.resolve_data(str(shard_dir))
    with pytest.raises(DataError, match="not found"):
        data.load_corpus(f"shards:{shard_dir}?tokenizer={shard_dir}/gone.model", shard_dir)


def test_shard_tokenizer_given_explicitly(shard_dir, tmp_path):
    elsewhere = tmp_path / "tokenizers" / "tiny.model"
    elsewhere.parent.mkdir()
    (shard_dir / "tiny.model").rename(elsewhere)

    resolved = data.resolve_data(str(shard_dir), tokenizer=elsewhere)
    corpus = data.load_corpus(resolved, tmp_path)

    assert resolved == f"shards:{shard_dir}?tokenizer={elsewhere}"
    assert data.resolve_data(resolved) == resolved
    assert corpus.vocab_size == 300


def test_shard_two_tokenizers_rejected(shard_dir):
    (shard_dir / "other.model").write_bytes((shard_dir / "tiny.model").read_bytes())

    with pytest.raises(DataError, match="several tokenizer models"):
        data.resolve_data(str(shard_dir))


def test_shard_invalid_tokenizer_rejected(shard_dir):
    (shard_dir / "tiny.model").write_bytes(b"not a model")

    with pytest.raises(DataError, match="not a valid SentencePiece model"):
        data.resolve_data(str(shard_dir))


@pytest.mark.parametrize("missing", ["train", "val"])
def test_shard_split_missing_rejected(shard_dir, missing):
    for path in shard_dir.glob(f"*_{missing}_*.bin"):
        path.unlink()

    with pytest.raises(DataError, match=f"no \\*_{missing}_\\*.bin shard"):
        data.resolve_data(f"shards:{shard_dir}")


def test_bytes_per_token_sum_to_utf8_length(tokenizer_model):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    table = data.sentencepiece_bytes_per_token(processor)
    # Words from the training text plus characters it never saw, which
    # SentencePiece encodes as byte-fallback pieces.
    sentences = [
        "the lazy dog is one training run",
        "Naïve café — 東京 warmdown  with  two spaces\tand a tab",
    ]

    for sentence in sentences:
        ids = processor.encode(sentence)
        assert processor.decode(ids) == sentence
        assert table[ids].sum() == len(sentence.encode("utf-8"))


def test_bytes_per_token_rules(tokenizer_model):
    processor = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model))
    table = data.sentencepiece_bytes_per_token(processor)

    assert table[processor.piece_to_id("<unk>")] == 0
    assert table[processor.piece_to_id("<s>")] == 0
    assert table[processor.piece_to_id("</s>")] == 0
    assert table[processor.piece_to_id("<0xE6>")] == 1
    assert table[processor.piece_to_id("\u2581the")] == 4


# ---------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------


def test_get_batch_deterministic():
    tokens = positions(5000)

    x1, y1 = data.get_batch(tokens, 8, 32, seed=3, step=17, device=CPU)
    x2, y2 = data.get_batch(tokens, 8, 32, seed=3, step=17, device=CPU)

    assert torch.equal(x1, x2)
    assert torch.equal(y1, y2)


def test_get_batch_differs_across_steps_and_seeds():
    tokens = positions(5000)
    x, _ = data.get_batch(tokens, 8, 32, seed=3, step=17, device=CPU)
    x_next_step, _ = data.get_batch(tokens, 8, 32, seed=3, step=18, device=CPU)
    x_other_seed, _ = data.get_batch(tokens, 8, 32, seed=4, step=17, device=CPU)

    assert not torch.equal(x, x_next_step)
    assert not torch.equal(x, x_other_seed)


def test_get_batch_targets_shifted():
    tokens = positions(5000)

    x, y = data.get_batch(tokens, 8, 32, seed=0, step=0, device=CPU)

    assert x.shape == (8, 32)
    assert y.shape == (8, 32)
    assert x.dtype == torch.int64
    assert y.dtype == torch.int64
    assert x.is_contiguous()
    assert y.is_contiguous()
    assert torch.equal(y, x + 1)  # each target is the token after its input
    assert torch.equal(x, x[:, :1] + torch.arange(32))  # each row is one contiguous window
    assert int(y.max()) <= 4999


def test_get_batch_reaches_last_token():
    tokens = positions(40)
    last_targets = set()
    for step in range(200):
        _, y = data.get_batch(tokens, 4, 32, seed=0, step=step, device=CPU)
        last_targets.update(y[:, -1].tolist())

    assert last_targets == set(range(32, 40))


def test_get_batch_across_shards():
    parts = [positions(300)[:100], positions(300)[100:250], positions(300)[250:]]
    sharded = data.ShardedTokens(parts)

    x, y = data.get_batch(sharded, 16, 64, seed=1, step=5, device=CPU)
    x_flat, y_flat = data.get_batch(positions(300), 16, 64, seed=1, step=5, device=CPU)

    assert torch.equal(x, x_flat)
    assert torch.equal(y, y_flat)


def test_get_batch_rejects_short_split():
    with pytest.raises(DataError, match="fewer than seq_len"):
        data.get_batch(positions(32), 2, 32, seed=0, step=0, device=CPU)


def test_get_batch_rejects_negative_step():
    with pytest.raises(ValueError, match="step=-1"):
        data.get_batch(positions(100), 2, 8, seed=0, step=-1, device=CPU)


def byte_corpus(train: np.ndarray, val: np.ndarray, bytes_per_token=None, vocab_size=256) -> data.Corpus:
    return data.Corpus(
        train=train,
        val=val,
        vocab_size=vocab_size,
        bytes_per_token=bytes_per_token,
        fingerprint="0" * 16,
        description="test corpus",
    )


def test_val_batches_cover_prefix():
    val = positions(1000)
    corpus = byte_corpus(positions(10), val, vocab_size=65536)

    batches = data.val_batches(corpus, batch_size=3, seq_len=16, val_tokens=200)

    inputs = torch.cat([x for x, _ in batches]).reshape(-1)
    targets = torch.cat([y for _, y in batches]).reshape(-1)
    assert batches.n_windows == 12  # 200 // 16
    assert batches.n_targets == 192
    assert len(batches) == 4
    assert [x.shape[0] for x, _ in batches] == [3, 3, 3, 3]
    assert torch.equal(inputs, torch.arange(0, 192))
    assert torch.equal(targets, torch.arange(1, 193))


def test_val_batches_last_batch_partial():
    corpus = byte_corpus(positions(10), positions(1000), vocab_size=65536)

    batches = data.val_batches(corpus, batch_size=4, seq_len=10, val_tokens=70)

    assert [x.shape[0] for x, _ in batches] == [4, 3]
    assert torch.equal(batches[-1][1][-1], torch.arange(61, 71))


def test_val_batches_short_split():
    corpus = byte_corpus(positions(10), positions(50), vocab_size=65536)

    batches = data.val_batches(corpus, batch_size=8, seq_len=16, val_tokens=10_000)

    assert batches.n_windows == 3  # (50 - 1) // 16
    assert torch.equal(batches[0][1][-1], torch.arange(33, 49))
    with pytest.raises(DataError, match="fewer than seq_len"):
        data.val_batches(byte_corpus(positions(10), positions(16)), 1, 16, 1000)


def test_val_batches_fixed():
    corpus = byte_corpus(positions(10), positions(500), vocab_size=65536)
    first = [tuple(t.clone() for t in pair) for pair in data.val_batches(corpus, 2, 8, 64)]
    second = list(data.val_batches(corpus, 2, 8, 64))

    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2)
        assert torch.equal(y1, y2)


# ---------------------------------------------------------------------------
# bits per byte
# ---------------------------------------------------------------------------


def test_bits_per_byte_byte_level():
    corpus = byte_corpus(positions(10), positions(10))
    targets = np.zeros((4, 25), dtype=np.int64)
    loss_sum = 1.5 * targets.size  # mean loss 1.5 nats per byte

    assert data.bits_per_byte(loss_sum, targets, corpus) == pytest.approx(1.5 / math.log(2))
    assert data.bits_per_byte(loss_sum, torch.from_numpy(targets), corpus) == pytest.approx(1.5 / math.log(2))


def test_bits_per_byte_sentencepiece():
    table = np.array([0.0, 1.0, 3.0, 5.0])
    corpus = byte_corpus(positions(10), positions(10), bytes_per_token=table, vocab_size=4)
    targets = torch.tensor([[1, 2, 3], [3, 0, 2]])
    # Bytes by hand: 1 + 3 + 5 + 5 + 0 + 3 = 17.
    loss_sum = 10.0

    assert data.count_bytes(targets, corpus) == 17
    assert data.bits_per_byte(loss_sum, targets, corpus) == pytest.approx(10.0 / math.log(2) / 17)


def test_bits_per_byte_zero_bytes_rejected():
    corpus = byte_corpus(positions(10), positions(10), bytes_per_token=np.array([0.0, 1.0]), vocab_size=2)

    with pytest.raises(ValueError, match="0 bytes"):
        data.bits_per_byte(3.0, np.array([0, 0]), corpus)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_get_batch_on_cuda():
    device = torch.device("cuda")
    tokens = positions(5000)

    x, y = data.get_batch(tokens, 8, 32, seed=3, step=17, device=device)
    x_cpu, y_cpu = data.get_batch(tokens, 8, 32, seed=3, step=17, device=CPU)

    assert x.device.type == "cuda"
    assert torch.equal(x.cpu(), x_cpu)
    assert torch.equal(y.cpu(), y_cpu)


def test_cache_directory_created(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "build_stdlib_text", lambda: b"Nested cache directory text. " * 40)
    cache = tmp_path / "a" / "b"

    data.load_corpus("stdlib-docs", cache)

    assert cache.is_dir()
    assert os.access(next(cache.glob("text-*.bin")), os.R_OK)
