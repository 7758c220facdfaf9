"""Tokenizer, default corpus, Megatron indexed dataset, preprocessing command and data pipeline."""
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.config import load_config
from training.data.corpus import default_corpus_files
from training.data.indexed_dataset import (INDEX_MAGIC, IndexedDatasetBuilder, IndexedDatasetError,
                                           MMapIndexedDataset, best_dtype)
from training.data.pipeline import build_data
from training.data.preprocess import preprocess
from training.data.tokenizer import EOD_TOKEN, load_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parents[2]
TEXT = ("def add(a, b):\n    return a + b\n\n"
        "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n") * 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        (d / f"doc{i}.py").write_text(TEXT.replace("Point", f"Point{i}") + "# é ü 日本 ✓\n")
    return d


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_bpe(sorted(corpus.iterdir()), vocab_size=400, save_path=path), path


def test_tokenizer_train_save_load_round_trip(tokenizer):
    tok, path = tokenizer
    assert 258 <= tok.vocab_size <= 400
    assert tok.eod_id == 0 and tok.tokenizer.id_to_token(0) == EOD_TOKEN
    again = load_tokenizer(path)
    for s in ["def add(a, b):\n    return a + b", "unseen ✓ 日本語 \t\x00 text", ""]:
        ids = tok.encode(s)
        assert again.encode(s) == ids
        assert tok.decode(ids) == s  # byte-level: lossless, nothing is unknown
    assert len(tok.encode("def add(a, b):")) < len("def add(a, b):")  # merges were learned


def test_tokenizer_training_is_deterministic(corpus, tokenizer):
    other = train_bpe(sorted(corpus.iterdir()), vocab_size=400)
    assert other.tokenizer.to_str() == tokenizer[0].tokenizer.to_str()


def test_default_corpus_is_deterministic_and_bounded():
    a = default_corpus_files(max_bytes=300_000)
    assert a == default_corpus_files(max_bytes=300_000)
    assert 0 < sum(p.stat().st_size for p in a) <= 300_000
    assert all(p.suffix == ".py" and "test" not in p.parts for p in a)


def test_default_corpus_skips_excluded_directories_at_any_depth(tmp_path):
    kept = ["a.py", "email/b.py", "email/mime/c.py", "x/config-d.py"]
    skipped = ["site-packages/pkg/e.py", "email/test/f.py", "x/__pycache__/g.py",
               "config-3.11/h.py", "config-i.py", "notes.txt", "x/tests/deep/j.py"]
    for rel in kept + skipped:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    got = default_corpus_files(root=tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in got] == sorted(kept)


def test_indexed_dataset_round_trip_and_megatron_header(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=n) for n in (5, 0, 17, 1, 300)]
    b = IndexedDatasetBuilder(tmp_path / "ds", dtype=np.uint16)
    for d in docs[:3]:
        b.add_document(d)
    b.add_item(docs[3])
    b.add_item(docs[4])
    b.end_document()
    b.finalize()
    assert not list(tmp_path.glob("*.tmp*"))
    ds = MMapIndexedDataset(tmp_path / "ds")
    assert len(ds) == 5 and ds.dtype == np.uint16
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds.tokens, np.concatenate(docs))
    np.testing.assert_array_equal(ds.doc_idx, [0, 1, 2, 3, 5])
    np.testing.assert_array_equal(ds.document(3), np.concatenate(docs[3:]))
    # the header, field by field, as Megatron-LM writes it
    raw = (tmp_path / "ds.idx").read_bytes()
    assert raw[:9] == INDEX_MAGIC == b"MMIDIDX\x00\x00"
    version, code, n, m = struct.unpack("<QBQQ", raw[9:34])
    assert (version, code, n, m) == (1, 8, 5, 5)  # 8 = uint16
    lengths = np.frombuffer(raw, np.int32, n, 34)
    pointers = np.frombuffer(raw, np.int64, n, 34 + 4 * n)
    np.testing.assert_array_equal(lengths, [5, 0, 17, 1, 300])
    np.testing.assert_array_equal(pointers, [0, 10, 10, 44, 46])  # byte offsets
    assert len(raw) == 34 + 12 * n + 8 * m
    assert best_dtype(50000) == np.uint16 and best_dtype(151936) == np.int32


def test_indexed_dataset_int32_and_damage_detection(tmp_path):
    b = IndexedDatasetBuilder(tmp_path / "big", dtype=np.int32)
    b.add_document([70000, 1, 2])
    b.finalize()
    ds = MMapIndexedDataset(tmp_path / "big")
    assert ds.dtype == np.int32 and list(ds[0]) == [70000, 1, 2]
    with open(tmp_path / "big.bin", "ab") as fh:
        fh.write(b"\x00")
    with pytest.raises(IndexedDatasetError, match="big.bin"):
        MMapIndexedDataset(tmp_path / "big")
    (tmp_path / "big.idx").write_bytes(b"NOTMAGIC!" + bytes(40))
    with pytest.raises(IndexedDatasetError, match="big.idx.*magic"):
        MMapIndexedDataset(tmp_path / "big")
    with pytest.raises(IndexedDatasetError, match="does not exist"):
        MMapIndexedDataset(tmp_path / "missing")


def test_preprocess_function_matches_tokenizer(corpus, tokenizer, tmp_path):
    tok, _ = tokenizer
    files = sorted(corpus.iterdir())
    lines = []
    stats = preprocess(files, tok, str(tmp_path / "p"), progress=lines.append)
    ds = MMapIndexedDataset(tmp_path / "p")
    assert len(ds) == len(files) == stats["documents"] and lines
    for f, i in zip(files, range(len(ds))):
        assert list(ds[i]) == tok.encode(f.read_text()) + [tok.eod_id]
    assert stats["tokens"] == ds.num_tokens


def test_preprocess_command_line(corpus, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "training.data.preprocess", "--input", str(corpus),
         "--train-tokenizer", "300", "--tokenizer", str(tmp_path / "t.json"),
         "--output-prefix", str(tmp_path / "cli")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout and "docs" in out.stdout
    assert len(MMapIndexedDataset(tmp_path / "cli")) == 6
    bad = subprocess.run([sys.executable, "-m", "training.data.preprocess", "--input", str(tmp_path / "none"),
                          "--tokenizer", "x.json", "--output-prefix", str(tmp_path / "x")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "none" in bad.stderr


def test_build_data_pipeline_caches(corpus, tmp_path):
    overrides = [f"data.corpus={corpus}", f"data.cache_dir={tmp_path}", "model.vocab_size=320",
                 "model.seq_length=16", "model.max_position_embeddings=16", "data.valid_fraction=0.1",
                 "training.micro_batch_size=2", "training.global_batch_size=4"]
    cfg = load_config(None, overrides)
    logs = []
    data = build_data(cfg, log=logs.append)
    assert any("byte-level BPE" in line for line in logs)
    assert data.tokenizer.vocab_size <= 320
    assert len(data.train) > len(data.valid) > 0
    x, y = data.train.batch(data.sampler.next_step()[0])
    assert x.shape == y.shape == (2, 16) and (x[:, 1:] == y[:, :-1]).all()
    again = build_data(load_config(None, overrides), log=logs.append)  # cached: no new training
    assert len(logs) == 2 and again.dataset.num_tokens == data.dataset.num_tokens
    assert (data.tokenizer.decode(data.dataset.tokens[:20]) in
            "".join(p.read_text() for p in sorted(corpus.iterdir())))


def test_build_data_refuses_a_tokenizer_larger_than_the_model_vocab(corpus, tokenizer, tmp_path):
    """build_data's own check (for callers that skip training.pretrain's parse-time one), and
    a tokenizer the run trains never exceeds model.vocab_size."""
    from training.errors import DataError

    tok, path = tokenizer
    small = tok.vocab_size - 1
    common = [f"data.corpus={corpus}", f"data.cache_dir={tmp_path}", "model.seq_length=16",
              "model.max_position_embeddings=16", "training.micro_batch_size=1",
              "training.global_batch_size=1"]
    cfg = load_config(None, common + [f"data.tokenizer={path}", f"model.vocab_size={small}"])
    with pytest.raises(DataError, match=rf"tokenizer has {tok.vocab_size} tokens but "
                                        rf"model.vocab_size is {small}"):
        build_data(cfg, log=lambda line: None)
    trained = build_data(load_config(None, common + ["model.vocab_size=300"]), log=lambda line: None)
    assert trained.tokenizer.vocab_size <= 300


def test_other_ranks_wait_for_rank_zero(corpus, tmp_path):
    import threading
    import time
    overrides = [f"data.corpus={corpus}", f"data.cache_dir={tmp_path}", "model.vocab_size=320",
                 "model.seq_length=16", "model.max_position_embeddings=16", "training.micro_batch_size=1",
                 "training.global_batch_size=2", "data.valid_fraction=0.1"]
    got = {}

    def rank(r):
        cfg = load_config(None, overrides, world_size=2)
        got[r] = build_data(cfg, rank=r, dp_rank=r, timeout=60, log=lambda line: None)

    waiter = threading.Thread(target=rank, args=(1,))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive()  # rank 1 waits: nothing built yet
    rank(0)
    waiter.join(60)
    a, b = (np.concatenate(got[r].sampler.next_step()) for r in (0, 1))
    assert len(a) == len(b) == 1 and a[0] != b[0]
    np.testing.assert_array_equal(got[0].dataset.tokens, got[1].dataset.tokens)
