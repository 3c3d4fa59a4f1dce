"""Tests of megaq.data (layer 6) and the tools that wrap it (train_tokenizer, preprocess_data)."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from megaq.data import (ByteTokenizer, CharTokenizer, GPTDataset, IndexedDataset, IndexedDatasetBuilder,
                        ResumableSampler, build_data_iterator, build_demo_corpus, build_tokenizer,
                        preprocess, read_documents)
from megaq.data.indexed_dataset import HEADER_SIZE

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"

needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_file(),
                                       reason=f"shared corpus {SHAKESPEARE} is absent (CI keeps ../shared beside the checkout)")


def load_tool(name: str):
    """Import tools/<name>.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_dataset(prefix, docs, dtype=np.uint16, vocab_size=None, eod_id=None) -> IndexedDataset:
    with IndexedDatasetBuilder(prefix, dtype, vocab_size=vocab_size, eod_id=eod_id) as b:
        for d in docs:
            b.add_document(d)
    return IndexedDataset(prefix)


# ----------------------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip_and_eod():
    tok = build_tokenizer({"type": "byte", "model": None})
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 257 and tok.eod_id == 256
    text = "Grüße, 世界! \n\ttabs"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids[:3] + [tok.eod_id] + ids[3:]) == text  # EOD has no text
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([257])


@needs_shakespeare
def test_char_tokenizer_shakespeare_vocab_save_load(tmp_path):
    tool = load_tool("train_tokenizer")
    vocab = tmp_path / "chars.json"
    tool.main(["--type", "char", "--input", str(SHAKESPEARE), "--output", str(vocab)])
    tok = build_tokenizer({"type": "char", "model": str(vocab)})
    assert isinstance(tok, CharTokenizer)
    assert len(tok.chars) == 65 and tok.vocab_size == 66 and tok.eod_id == 65
    assert tok.chars == sorted(tok.chars)
    text = SHAKESPEARE.read_text(encoding="utf-8")[:5000]
    ids = tok.encode(text)
    assert len(ids) == len(text) and max(ids) < 65
    assert tok.decode(ids + [tok.eod_id]) == text
    with pytest.raises(ValueError, match=r"'é' \(U\+00E9\) at position 3"):
        tok.encode("abcé")


def test_char_tokenizer_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        build_tokenizer({"type": "char", "model": str(tmp_path / "missing.json")})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CharTokenizer.load(bad)
    bad.write_text(json.dumps({"chars": ["a"]}))
    with pytest.raises(ValueError, match="not a megaq char vocabulary"):
        CharTokenizer.load(bad)
    with pytest.raises(ValueError, match="duplicate"):
        CharTokenizer(["a", "a"])


def test_build_tokenizer_rejects_bad_specs():
    with pytest.raises(ValueError, match="'type' must be one of"):
        build_tokenizer({"type": "gpt2", "model": None})
    with pytest.raises(ValueError, match="needs 'model'"):
        build_tokenizer({"type": "sentencepiece", "model": None})
    with pytest.raises(ValueError, match="unknown keys"):
        build_tokenizer({"type": "byte", "model": None, "vocab": 3})


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"shared corpus {SHAKESPEARE} is absent")
    d = tmp_path_factory.mktemp("spm")
    corpus = d / "shakespeare_100k.txt"
    corpus.write_bytes(SHAKESPEARE.read_bytes()[:100_000])
    load_tool("train_tokenizer").main(["--input", str(corpus), "--output-prefix", str(d / "tiny"),
                                       "--vocab-size", "200", "--model-type", "bpe", "--num-threads", "1"])
    return d / "tiny.model", corpus


def test_sentencepiece_round_trip(spm_model):
    model, corpus = spm_model
    assert model.is_file() and model.with_suffix(".vocab").is_file()
    tok = build_tokenizer({"type": "sentencepiece", "model": str(model)})
    assert tok.vocab_size == 200 and tok.eod_id == 2
    text = corpus.read_text(encoding="utf-8")[:20000]
    ids = tok.encode(text)
    assert len(ids) < len(text) * 0.8  # merges learned: fewer tokens than characters
    assert tok.decode(ids) == text  # lossless, newlines and runs of spaces included
    assert tok.decode(tok.encode("  two  spaces\n\nand a blank line ")) == "  two  spaces\n\nand a blank line "


def test_sentencepiece_unigram_from_jsonl(tmp_path):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"shared corpus {SHAKESPEARE} is absent")
    text = SHAKESPEARE.read_text(encoding="utf-8")[:60000]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": b}) + "\n" for b in text.split("\n\n")))
    load_tool("train_tokenizer").main(["--input", str(jsonl), "--json-key", "body", "--output-prefix",
                                       str(tmp_path / "uni"), "--vocab-size", "150", "--model-type", "unigram"])
    tok = build_tokenizer({"type": "sentencepiece", "model": str(tmp_path / "uni.model")})
    assert tok.vocab_size == 150
    assert tok.decode(tok.encode(text[:3000])) == text[:3000]


def test_sentencepiece_missing_and_corrupt_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        build_tokenizer({"type": "sentencepiece", "model": str(tmp_path / "nope.model")})
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="cannot load sentencepiece model"):
        build_tokenizer({"type": "sentencepiece", "model": str(junk)})


# ------------------------------------------------------------------------------------ indexed dataset

@pytest.mark.parametrize("dtype,max_id", [(np.uint16, 65535), (np.int32, 1_000_000)])
def test_indexed_dataset_round_trip(tmp_path, dtype, max_id):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, max_id + 1, size=n) for n in (5, 0, 17, 1, 64)]
    docs[0][0] = max_id  # the largest id the dtype must hold
    prefix = tmp_path / "ds"
    ds = write_dataset(prefix, docs, dtype, vocab_size=max_id + 1, eod_id=max_id)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]  # no temporary files left behind
    assert ds.dtype == np.dtype(dtype)
    assert os.path.getsize(f"{prefix}.bin") == sum(map(len, docs)) * np.dtype(dtype).itemsize
    assert len(ds) == 5 and ds.total_tokens == 87
    assert ds.vocab_size == max_id + 1 and ds.eod_id == max_id
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    np.testing.assert_array_equal(ds[-1], docs[-1])
    with pytest.raises(IndexError):
        ds[5]
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers re-open the files
    np.testing.assert_array_equal(clone[2], docs[2])


def test_indexed_builder_rejects_out_of_range_ids(tmp_path):
    with IndexedDatasetBuilder(tmp_path / "a", np.uint16) as b:
        with pytest.raises(ValueError, match="token id 65536 outside"):
            b.add_document([1, 65536])
        with pytest.raises(ValueError, match="token id -1 outside"):
            b.add_document([-1])
    with IndexedDatasetBuilder(tmp_path / "b", np.int32, vocab_size=100) as b:
        with pytest.raises(ValueError, match="token id 100 outside"):
            b.add_document([100])
    with pytest.raises(ValueError, match="uint16 or int32"):
        IndexedDatasetBuilder(tmp_path / "c", np.int64)


def test_indexed_builder_abort_keeps_existing_files(tmp_path):
    prefix = tmp_path / "ds"
    write_dataset(prefix, [[1, 2, 3]])
    with pytest.raises(RuntimeError, match="boom"):
        with IndexedDatasetBuilder(prefix, np.uint16) as b:
            b.add_document([9, 9])
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]
    np.testing.assert_array_equal(IndexedDataset(prefix)[0], [1, 2, 3])


def test_indexed_dataset_detects_missing_and_corrupt_files(tmp_path):
    prefix = tmp_path / "ds"
    write_dataset(prefix, [[1, 2, 3], [4, 5]])
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    good_idx, good_bin = idx.read_bytes(), bin_.read_bytes()

    idx.write_bytes(b"NOTMEGAQ" + good_idx[8:])
    with pytest.raises(ValueError, match=r"ds\.idx is not a megaq index"):
        IndexedDataset(prefix)

    idx.write_bytes(good_idx[:8] + (99).to_bytes(4, "little") + good_idx[12:])
    with pytest.raises(ValueError, match="unsupported index format version 99"):
        IndexedDataset(prefix)

    idx.write_bytes(good_idx[:-3])
    with pytest.raises(ValueError, match=r"corrupt index .*ds\.idx"):
        IndexedDataset(prefix)

    # A length changed so the lengths no longer add up to the recorded total.
    broken = bytearray(good_idx)
    broken[HEADER_SIZE] = 7
    idx.write_bytes(bytes(broken))
    with pytest.raises(ValueError, match="do not add up"):
        IndexedDataset(prefix)

    idx.write_bytes(good_idx)
    bin_.write_bytes(good_bin[:-2])
    with pytest.raises(ValueError, match=r"ds\.bin has 8 bytes .* truncated"):
        IndexedDataset(prefix)

    bin_.unlink()
    with pytest.raises(FileNotFoundError, match=r"ds\.bin"):
        IndexedDataset(prefix)
    with pytest.raises(FileNotFoundError, match=r"other\.idx"):
        IndexedDataset(tmp_path / "other")


# --------------------------------------------------------------------------------------- preprocess

DOCS = ["First document,\nwith two lines.", "Second: ünïcode ✓", "third\n  indented line", "4"]


def expected_tokens(docs, spec):
    tok = build_tokenizer(spec)
    return [tok.encode(d) for d in docs]


def assert_dataset_matches(prefix, docs, spec):
    ds = IndexedDataset(prefix)
    tok = build_tokenizer(spec)
    want = expected_tokens(docs, spec)
    assert len(ds) == len(want)
    for i, w in enumerate(want):
        assert ds[i].tolist() == w
    assert ds.vocab_size == tok.vocab_size and ds.eod_id == tok.eod_id


def test_preprocess_text_blocks_and_lines_with_workers(tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(DOCS) + "\n\n\n")
    spec = {"type": "byte", "model": None}
    tool = load_tool("preprocess_data")
    tool.main(["--input", str(src), "--output-prefix", str(tmp_path / "blocks"), "--workers", "2",
               "--chunk-size", "1", "--no-progress"])
    assert_dataset_matches(tmp_path / "blocks", DOCS, spec)

    stats = preprocess(src, tmp_path / "lines", spec, split_lines=True, workers=2, progress=False)
    lines = [line for d in DOCS for line in d.split("\n")]
    assert stats["documents"] == len(lines)
    assert_dataset_matches(tmp_path / "lines", lines, spec)


def test_preprocess_jsonl_with_sentencepiece_workers(tmp_path, spm_model):
    model, corpus = spm_model
    docs = corpus.read_text(encoding="utf-8")[:20000].split("\n\n")
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    spec = {"type": "sentencepiece", "model": str(model)}
    stats = preprocess(src, tmp_path / "out", spec, workers=2, chunk_size=3, progress=True)
    assert stats["documents"] == len(docs) and stats["tokens"] == sum(map(len, expected_tokens(docs, spec)))
    assert_dataset_matches(tmp_path / "out", docs, spec)


def test_preprocess_hf_save_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": DOCS})}).save_to_disk(str(path))
    spec = {"type": "byte", "model": None}
    preprocess(path, tmp_path / "out", spec, json_key="content", workers=2, progress=False)
    assert_dataset_matches(tmp_path / "out", DOCS, spec)
    with pytest.raises(ValueError, match="no column 'text'"):
        list(read_documents(path))
    with pytest.raises(ValueError, match="no split 'valid'"):
        list(read_documents(path, json_key="content", split="valid"))


def test_preprocess_reports_bad_inputs(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl:2: no key 'text'"):
        preprocess(src, tmp_path / "out", {"type": "byte", "model": None}, progress=False)
    assert not list(tmp_path.glob("out*"))  # nothing half-written
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        preprocess(tmp_path / "absent.txt", tmp_path / "out", {"type": "byte", "model": None}, progress=False)
    vocab = tmp_path / "abc.json"
    CharTokenizer(["a", "b", "c"]).save(vocab)
    txt = tmp_path / "t.txt"
    txt.write_text("abc\n\nabz\n")
    with pytest.raises(ValueError, match=r"document 1: character 'z'"):
        preprocess(txt, tmp_path / "out", {"type": "char", "model": str(vocab)}, workers=2, progress=False)


# -------------------------------------------------------------------------------------- GPT dataset

def numbered_docs(n_docs, length):
    """Document d holds the ids d*100 .. d*100+length-1, so every token tells its document."""
    return [np.arange(d * 100, d * 100 + length) for d in range(n_docs)]


def test_gpt_dataset_windows_and_split(tmp_path):
    eod = 9999
    docs = numbered_docs(20, 7)
    ds = write_dataset(tmp_path / "ds", docs, vocab_size=10000, eod_id=eod)
    seq = 5
    train = GPTDataset(ds, seq, "train", valid_fraction=0.1, seed=3)
    valid = GPTDataset(ds, seq, "valid", valid_fraction=0.1, seed=3)
    assert train.num_documents == 18 and valid.num_documents == 2

    # Reference stream: the shuffled train documents joined with EOD after each.
    order = np.random.default_rng(3).permutation(18)
    stream = np.concatenate([np.append(docs[d], eod) for d in order])
    assert train.num_tokens == len(stream) == 18 * 8
    assert len(train) == (len(stream) - 1) // seq
    for i in range(len(train)):
        s = train[i]
        assert s["input_ids"].dtype == torch.int64 and s["input_ids"].shape == (seq,)
        np.testing.assert_array_equal(s["input_ids"].numpy(), stream[i * seq:(i + 1) * seq])
        np.testing.assert_array_equal(s["labels"].numpy(), stream[i * seq + 1:(i + 1) * seq + 1])

    def docs_of(d):
        return {int(t) // 100 for i in range(len(d)) for t in d[i]["input_ids"].tolist() if t != eod}

    assert docs_of(valid) == {18, 19}
    assert docs_of(train).isdisjoint(docs_of(valid)) and docs_of(train) == set(range(18))
    valid_stream = np.concatenate([np.append(docs[d], eod) for d in (18, 19)])
    np.testing.assert_array_equal(valid[1]["labels"].numpy(), valid_stream[seq + 1:2 * seq + 1])
    with pytest.raises(IndexError):
        valid[len(valid)]


def test_gpt_dataset_single_document_splits_by_tokens(tmp_path):
    ds = write_dataset(tmp_path / "one", [np.arange(1000) % 60], vocab_size=66, eod_id=65)
    train = GPTDataset(ds, 16, "train", valid_fraction=0.1)
    valid = GPTDataset(ds, 16, "valid", valid_fraction=0.1)
    assert train.num_tokens == 900 and valid.num_tokens == 100 + 1  # valid ends with the EOD
    assert train.window(0).tolist() == list(range(17))
    assert valid.window(0)[:5].tolist() == [(900 + k) % 60 for k in range(5)]

    # Spawned DataLoader workers get a pickled dataset: the 200 KB token map must not travel in it.
    big = GPTDataset(write_dataset(tmp_path / "big", [np.arange(100_000) % 60], vocab_size=66, eod_id=65), 16)
    payload = pickle.dumps(big)
    assert len(payload) < 10_000
    np.testing.assert_array_equal(pickle.loads(payload).window(1234), big.window(1234))


def test_gpt_dataset_errors(tmp_path):
    ds = write_dataset(tmp_path / "small", [[1, 2, 3], [4, 5]], vocab_size=10, eod_id=9)
    with pytest.raises(ValueError, match=r"'valid' split .* has 3 tokens .* seq_len=8 needs 9"):
        GPTDataset(ds, 8, "valid", valid_fraction=0.5)
    with pytest.raises(ValueError, match="split must be one of"):
        GPTDataset(ds, 2, "test")
    with pytest.raises(ValueError, match="valid_fraction"):
        GPTDataset(ds, 2, valid_fraction=1.0)
    with pytest.raises(ValueError, match="differs from the id 9"):
        GPTDataset(ds, 2, eod_id=3)
    no_eod = write_dataset(tmp_path / "noeod", [[1, 2, 3]])
    with pytest.raises(ValueError, match="no end-of-document id; pass eod_id"):
        GPTDataset(no_eod, 2)
    assert GPTDataset(no_eod, 2, valid_fraction=0.0, eod_id=0).window(0).tolist() == [1, 2, 3]


# ------------------------------------------------------------------------------------------ sampler

def take(sampler, steps):
    it = iter(sampler)
    return [next(it) for _ in range(steps)]


def test_sampler_is_deterministic_and_covers_each_epoch():
    a = take(ResumableSampler(10, 3, 0, 1, seed=7), 7)
    b = take(ResumableSampler(10, 3, 0, 1, seed=7), 7)
    assert a == b
    assert a != take(ResumableSampler(10, 3, 0, 1, seed=8), 7)
    flat = [i for batch in a for i in batch]
    # Epochs back to back, no sample dropped at the boundary (step 4 straddles epochs 0 and 1).
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]


def test_sampler_ranks_are_disjoint_and_partition_each_step():
    dp, micro, n = 3, 2, 30
    per_rank = [take(ResumableSampler(n, micro, r, dp, seed=1), 5) for r in range(dp)]
    single = [i for batch in take(ResumableSampler(n, micro * dp, 0, 1, seed=1), 5) for i in batch]
    for step in range(5):
        batches = [per_rank[r][step] for r in range(dp)]
        assert all(len(b) == micro for b in batches)
        assert len(set().union(*map(set, batches))) == micro * dp  # disjoint across ranks
        # Rank r takes the r-th slice of the step's global batch.
        assert sum(batches, []) == single[step * micro * dp:(step + 1) * micro * dp]


def test_sampler_resume_matches_uninterrupted_run():
    full = take(ResumableSampler(23, 4, 1, 2, seed=5), 12)
    s = ResumableSampler(23, 4, 1, 2, seed=5)
    first = take(s, 5)
    state = s.state_dict()
    assert state["consumed_samples"] == 5 * 8
    resumed = ResumableSampler(23, 4, 1, 2, seed=5, consumed_samples=state["consumed_samples"])
    assert first + take(resumed, 7) == full
    again = ResumableSampler(23, 4, 1, 2, seed=5)
    again.load_state_dict(state)
    assert take(again, 7) == full[5:]
    with pytest.raises(ValueError, match="seed=6"):
        ResumableSampler(23, 4, 1, 2, seed=6).load_state_dict(state)


def test_sampler_resume_with_different_dp_size_continues_global_order():
    global_stream = [i for b in take(ResumableSampler(17, 6, 0, 1, seed=2), 10) for i in b]
    # 4 steps on dp=2 x micro 3, then resume on dp=3 x micro 2: same global batch, same stream.
    resumed = [take(ResumableSampler(17, 2, r, 3, seed=2, consumed_samples=24), 3) for r in range(3)]
    for step in range(3):
        got = sum((resumed[r][step] for r in range(3)), [])
        assert got == global_stream[24 + step * 6:24 + (step + 1) * 6]


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dp_rank"):
        ResumableSampler(10, 2, 2, 2, seed=0)
    with pytest.raises(ValueError, match="num_samples"):
        ResumableSampler(0, 2, 0, 1, seed=0)


def test_data_iterator_batches_and_consumed_samples(tmp_path):
    ds = write_dataset(tmp_path / "ds", numbered_docs(6, 9), vocab_size=10000, eod_id=9999)
    gpt = GPTDataset(ds, 4, "train", valid_fraction=0.2)
    sampler = ResumableSampler(len(gpt), 3, 1, 2, seed=0, consumed_samples=6)
    it = build_data_iterator(gpt, sampler)
    expect = ResumableSampler(len(gpt), 3, 1, 2, seed=0, consumed_samples=6)
    for step in range(3):
        batch = next(it)
        idx = expect.indices_at(6 + step * 6)
        assert batch["input_ids"].shape == (3, 4) and batch["labels"].dtype == torch.int64
        torch.testing.assert_close(batch["labels"], torch.stack([gpt[i]["labels"] for i in idx]))
    assert it.consumed_samples == 6 + 3 * 6 and it.state_dict()["consumed_samples"] == 24


def test_data_workers_survive_the_stop_signals_a_scheduler_sends(tmp_path):
    # SLURM / launchers signal every process of a job; the loader's workers must keep feeding the step
    # during which the training process saves, so they ignore SIGTERM and SIGUSR1.
    import signal

    ds = write_dataset(tmp_path / "ds", numbered_docs(6, 9), vocab_size=10000, eod_id=9999)
    gpt = GPTDataset(ds, 4, "train", valid_fraction=0.2)
    it = build_data_iterator(gpt, ResumableSampler(len(gpt), 2, 0, 1, seed=0), num_workers=1)
    next(it)
    for worker in it._batches._workers:
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGUSR1)
    for _ in range(4):
        assert next(it)["input_ids"].shape == (2, 4)


# -------------------------------------------------------------------------------------- demo corpus

def test_demo_corpus_builds_deterministically_and_reuses(tmp_path, caplog):
    modules = ["textwrap", "json"]
    with caplog.at_level("INFO", logger="megaq.data.demo_corpus"):
        p1 = build_demo_corpus(tmp_path / "a", modules=modules)
    assert "built a demo corpus" in caplog.text and str(tmp_path / "a") in caplog.text
    p2 = build_demo_corpus(tmp_path / "b", modules=list(reversed(modules)))
    for ext in (".bin", ".idx"):
        assert Path(p1 + ext).read_bytes() == Path(p2 + ext).read_bytes()
    ds = IndexedDataset(p1)
    tok = ByteTokenizer()
    assert len(ds) == 2 and ds.eod_id == tok.eod_id
    text = tok.decode(ds[0].tolist())  # json sorts before textwrap
    assert text.startswith("json\n\nJSON (JavaScript Object Notation)")
    assert "json.dumps\n\nSerialize ``obj`` to a JSON formatted ``str``." in text
    assert tok.decode(ds[1].tolist()).startswith("textwrap\n\n")

    mtime = os.stat(p1 + ".bin").st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO", logger="megaq.data.demo_corpus"):
        assert build_demo_corpus(tmp_path / "a", modules=modules) == p1
    assert "using the demo corpus" in caplog.text and os.stat(p1 + ".bin").st_mtime_ns == mtime
    build_demo_corpus(tmp_path / "a", modules=["json"])  # a different manifest rebuilds
    assert len(IndexedDataset(p1)) == 1
    with pytest.raises(ValueError, match="not a pure-Python module"):
        build_demo_corpus(tmp_path / "c", modules=["no_such_module_xyz"])
