"""A synthetic corpus whose exact likelihood is known: a sparse Markov chain over word types.

What a model's perplexity bound should be compared with is the entropy of the data. On real text
it is unknown; here it is exact. A :class:`MarkovSource` is a transition matrix P over token ids
``0..N-1`` (word types, an EOS token, optionally an ``[UNK]`` that is never emitted). A document
is a path that starts from the start distribution P[EOS] and runs until it emits EOS, so a
document has at least one word (P[EOS, EOS] = 0) and exactly one EOS, at its end. Concatenating
independent documents (hdlm's packing, App. E: each document followed by its EOS) therefore gives
a token stream that is itself the Markov chain P started from a virtual EOS at position −1.

Exact quantities (all in nats, float64):

- :func:`sequence_nll`: −log P(x) of a token sequence given the distribution of its first token.
- :func:`block_marginals`: m_k, the exact marginal of the stream at the start of packed block k,
  m_k = e_EOS P^{kd+1} (the distribution of token kd of the stream).
- :func:`reference_nll`: on consecutive packed blocks (block k = tokens [kd, (k+1)d) of one
  split's stream), the source's NLL with the true context (the first token of block k
  conditioned on the last token of block k − 1) and the *attainable limit after packing*,
  −log m_k(x_0) − Σ_i log P(x_i | x_{i−1}): a model that sees one block at a time cannot know
  its first token's context, and in expectation no model pays less than this for a block.
- :func:`entropy_rate`: Σ_a π_a H(P_a) with π the stationary distribution.
- :func:`allowed_fraction`: the fraction of a sampled sequence's transitions that P allows.

:func:`write_corpus` writes ``{split}.txt`` files (one document per line, which
``data.dataset=<folder>/{split}.txt`` reads), a word-level ``tokenizer.json`` with the EOS
(``data.tokenizer=<folder>``), the source itself and each split's token stream, so that the
tokens hdlm's pipeline produces can be checked against the source's.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from .errors import HDLMError

EOS = "<|endoftext|>"  # the first end-of-text token hdlm.tokenizers looks for
UNK = "[UNK]"
SOURCE_FILE = "source.npz"
MANIFEST = "corpus.json"  # written last: a folder without it is incomplete
ROW_TOLERANCE = 1e-9


@dataclass(frozen=True)
class MarkovSource:
    """A Markov chain over token ids with an EOS state; ``words[i]`` is the text of token i.

    ``transition`` (N, N) float64 is row-stochastic; row EOS is the start distribution of a
    document. Tokens that the chain never emits (``[UNK]``) may have any row.
    """

    transition: np.ndarray
    words: tuple[str, ...]
    eos_id: int

    def __post_init__(self) -> None:
        P = np.asarray(self.transition, dtype=np.float64)
        object.__setattr__(self, "transition", P)
        object.__setattr__(self, "words", tuple(self.words))
        N = len(self.words)
        if P.shape != (N, N):
            raise HDLMError(f"Markov source: transition matrix of shape {P.shape}, expected ({N}, {N}) "
                            f"for {N} words")
        if not 0 <= self.eos_id < N or self.words[self.eos_id] != EOS:
            raise HDLMError(f"Markov source: eos_id {self.eos_id} must name the word {EOS!r}")
        if len(set(self.words)) != N or any(not w or any(c.isspace() for c in w) for w in self.words):
            raise HDLMError("Markov source: words must be distinct, non-empty and free of whitespace")
        if (P < 0).any() or not np.allclose(P.sum(1), 1.0, atol=ROW_TOLERANCE, rtol=0):
            raise HDLMError("Markov source: every row of the transition matrix must be a distribution")
        if P[self.eos_id, self.eos_id] > 0:
            raise HDLMError("Markov source: P[EOS, EOS] must be 0 (a document has at least one word)")

    @property
    def N(self) -> int:
        return len(self.words)

    @property
    def start(self) -> np.ndarray:
        """The distribution of a document's first token (row EOS of the transition matrix)."""
        return self.transition[self.eos_id]

    @property
    def emitted(self) -> np.ndarray:
        """(N,) bool: tokens the chain can emit (reachable from EOS), e.g. not ``[UNK]``."""
        reach = np.zeros(self.N, dtype=bool)
        reach[self.eos_id] = True
        support = self.transition > 0
        while True:
            grown = reach | support[reach].any(0)
            if (grown == reach).all():
                return reach
            reach = grown

    @property
    def log_transition(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(self.transition)


def random_markov_source(n_words: int = 300, branching: tuple[int, int] = (3, 8), mean_length: float = 16.0,
                         start_words: Optional[int] = None, seed: int = 0) -> MarkovSource:
    """A seeded random sparse chain: ids 0 = EOS, 1 = ``[UNK]`` (never emitted), 2.. = words w0, w1, ….

    Each word is followed by EOS with probability e ~ U(0.5, 1.5) / ``mean_length`` (documents of
    random, roughly geometric length) and otherwise by one of k ~ U{branching} successors drawn
    uniformly among the words, with Dirichlet(1) weights. Documents start from ``start_words``
    (default n_words / 10) words, also with Dirichlet(1) weights.
    """
    lo, hi = branching
    if n_words < 1 or not 1 <= lo <= hi <= n_words or mean_length < 1.5:
        raise HDLMError(f"random Markov source: need n_words >= 1, 1 <= branching[0] <= branching[1] <= n_words "
                        f"and mean_length >= 1.5 (got {n_words}, {branching}, {mean_length})")
    rng = np.random.default_rng(seed)
    first = 2
    N = n_words + first
    P = np.zeros((N, N))
    for a in range(first, N):
        e = min(0.999, rng.uniform(0.5, 1.5) / mean_length)
        succ = first + rng.choice(n_words, size=int(rng.integers(lo, hi + 1)), replace=False)
        P[a, succ] = (1.0 - e) * rng.dirichlet(np.ones(len(succ)))
        P[a, 0] = e
    k = max(1, min(n_words, start_words if start_words is not None else n_words // 10))
    P[0, first + rng.choice(n_words, size=k, replace=False)] = rng.dirichlet(np.ones(k))
    P[1] = P[0]  # [UNK] is never reached; its row only has to be a distribution
    return MarkovSource(P, (EOS, UNK, *(f"w{i}" for i in range(n_words))), eos_id=0)


# -------------------------------------------------------------------------------------------
# sampling


def _inverse_cdf_table(P: np.ndarray) -> np.ndarray:
    """Row-wise CDFs with every entry from a row's last positive one on set to exactly 1, so that
    counting the entries ≤ u (u ∈ [0, 1)) never lands on a zero-probability token despite rounding."""
    cdf = np.cumsum(P, axis=1)
    last = P.shape[1] - 1 - np.argmax(P[:, ::-1] > 0, axis=1)
    cdf[np.arange(P.shape[1])[None, :] >= last[:, None]] = 1.0
    return cdf


def sample_documents(source: MarkovSource, n_tokens: int, seed: int = 0, batch: int = 4096) -> list[np.ndarray]:
    """Independent documents (each ending with its EOS) until they hold at least ``n_tokens`` tokens.

    Documents are drawn ``batch`` at a time, each a chain started at EOS and stopped at the next
    EOS, by inverse-CDF sampling (one uniform per token). Their concatenation is the chain P run
    from a virtual EOS, the stream that hdlm's packing builds from them.
    """
    if n_tokens < 1:
        raise HDLMError(f"sample_documents: n_tokens = {n_tokens} must be >= 1")
    rng = np.random.default_rng(seed)
    cdf = _inverse_cdf_table(source.transition)
    eos = source.eos_id
    docs: list[np.ndarray] = []
    total = 0
    while total < n_tokens:
        x = np.full(batch, eos)
        alive = np.arange(batch)
        steps = []
        while alive.size:  # only unfinished documents draw: the work is one row scan per token
            u = rng.random(alive.size)
            x[alive] = (cdf[x[alive]] <= u[:, None]).sum(1)
            steps.append((alive, x[alive]))
            alive = alive[x[alive] != eos]
        paths = np.full((batch, len(steps)), -1, dtype=np.int64)
        for t, (idx, tok) in enumerate(steps):
            paths[idx, t] = tok
        for row in paths:
            doc = row[row >= 0]
            docs.append(doc)
            total += len(doc)
            if total >= n_tokens:
                break
    return docs


# -------------------------------------------------------------------------------------------
# exact likelihoods


def sequence_nll(source: MarkovSource, tokens: np.ndarray, first: np.ndarray) -> np.ndarray:
    """−log P(tokens) (nats) for sequences (…, L), given the distribution of their first token.

    ``first``: (N,) or (…, N). Infinite where a token or a transition has probability 0.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    first = np.broadcast_to(np.asarray(first, dtype=np.float64), tokens.shape[:-1] + (source.N,))
    with np.errstate(divide="ignore"):
        head = -np.log(np.take_along_axis(first, tokens[..., :1], axis=-1)[..., 0])
    steps = -source.log_transition[tokens[..., :-1], tokens[..., 1:]].sum(-1)
    return head + steps


def block_marginals(source: MarkovSource, d: int, n_blocks: int) -> np.ndarray:
    """(n_blocks, N): m_k, the exact distribution of stream token kd (block k's first token).

    The stream is the chain run from a virtual EOS at position −1, so m_0 = P[EOS] and
    m_{k+1} = m_k P^d (one d-th power, then a vector-matrix product per block).
    """
    if d < 1 or n_blocks < 0:
        raise HDLMError(f"block_marginals: need d >= 1 and n_blocks >= 0 (got {d}, {n_blocks})")
    Pd = np.linalg.matrix_power(source.transition, d)
    out = np.empty((n_blocks, source.N))
    m = source.start.copy()
    for k in range(n_blocks):
        out[k] = m
        m = m @ Pd
        m /= m.sum()  # keep rounding from accumulating over many blocks
    return out


def reference_nll(source: MarkovSource, blocks: np.ndarray) -> dict[str, np.ndarray]:
    """Per-block exact NLLs (nats) of consecutive packed blocks (n, d) of one split's stream.

    ``blocks[k]`` must be tokens [kd, (k+1)d) of the stream (the first n blocks of a split, as
    hdlm's :class:`~hdlm.data.TokenDataset` serves them). Returns ``{"source": (n,), "limit": (n,)}``:
    the source's NLL with the true context (block k's first token given block k − 1's last
    token; block 0 starts the stream) and the attainable limit after packing (first token
    under the exact marginal m_k, no context).
    """
    blocks = np.asarray(blocks, dtype=np.int64)
    if blocks.ndim != 2 or blocks.shape[1] < 1:
        raise HDLMError(f"reference_nll: blocks must be (n, d), got shape {blocks.shape}")
    n, d = blocks.shape
    prev = np.concatenate([[source.eos_id], blocks[:-1, -1]])
    context = source.transition[prev]
    return {"source": sequence_nll(source, blocks, context),
            "limit": sequence_nll(source, blocks, block_marginals(source, d, n))}


def stationary(source: MarkovSource) -> np.ndarray:
    """The stationary distribution π = π P of the chain restricted to the emitted tokens."""
    idx = np.flatnonzero(source.emitted)
    P = source.transition[np.ix_(idx, idx)]
    A = np.vstack([P.T - np.eye(len(idx)), np.ones(len(idx))])
    b = np.zeros(len(idx) + 1)
    b[-1] = 1.0
    pi_sub = np.linalg.lstsq(A, b, rcond=None)[0].clip(min=0.0)
    pi = np.zeros(source.N)
    pi[idx] = pi_sub / pi_sub.sum()
    return pi


def entropy_rate(source: MarkovSource) -> float:
    """H = Σ_a π_a H(P_a) in nats per token: the long-run per-token NLL of the source itself."""
    P = source.transition
    with np.errstate(divide="ignore", invalid="ignore"):
        row_h = -np.where(P > 0, P * np.log(P), 0.0).sum(1)
    return float(stationary(source) @ row_h)


def allowed_fraction(source: MarkovSource, sequences: Sequence[Sequence[int]] | np.ndarray) -> tuple[int, int]:
    """``(allowed, total)`` over the transitions (x_{i−1}, x_i) of every sequence.

    A transition is allowed when P gives it positive probability and x_{i−1} is a token the
    source emits; ids outside ``0..N-1`` (MASK, BOS) are never allowed.
    """
    support = (source.transition > 0) & source.emitted[:, None]
    allowed = total = 0
    for seq in sequences:
        x = np.asarray(seq, dtype=np.int64)
        if len(x) < 2:
            continue
        a, b = x[:-1], x[1:]
        inside = (a >= 0) & (a < source.N) & (b >= 0) & (b < source.N)
        ok = np.zeros(len(a), dtype=bool)
        ok[inside] = support[a[inside], b[inside]]
        allowed += int(ok.sum())
        total += len(a)
    return allowed, total


# -------------------------------------------------------------------------------------------
# the corpus on disk: text files, tokenizer, source, streams


def word_tokenizer(source: MarkovSource):
    """A HF word-level tokenizer whose ids are the source's token ids (whitespace-separated words)."""
    import tokenizers as hf

    vocab = {w: i for i, w in enumerate(source.words)}
    tk = hf.Tokenizer(hf.models.WordLevel(vocab, unk_token=UNK))
    tk.pre_tokenizer = hf.pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([hf.AddedToken(EOS, special=True)])
    return tk


def document_text(source: MarkovSource, doc: np.ndarray) -> str:
    """One document as a line of text: its words without the final EOS (the packing appends it)."""
    return " ".join(source.words[t] for t in doc[:-1])


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_npy(arr: np.ndarray):
    def write(path: Path) -> None:
        with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a temporary name
            np.save(f, arr)
    return write


def _save_npz(**arrays: np.ndarray):
    def write(path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    return write


def _fingerprint(source: MarkovSource) -> str:
    import hashlib

    h = hashlib.sha256(source.transition.tobytes())
    h.update("\n".join(source.words).encode())
    return h.hexdigest()[:16]


def write_corpus(source: MarkovSource, folder: str | Path, tokens: Mapping[str, int], seed: int = 0) -> dict:
    """Sample and write a corpus: ``{split}.txt`` and ``{split}.tokens.npy`` per split of ``tokens``
    (split name → at least this many tokens), ``tokenizer.json``, ``source.npz``, ``corpus.json``.

    Splits are independent streams (seeds (seed, i)), each started at a virtual EOS as hdlm's
    packing of a split starts. A folder whose manifest already records the same source, sizes and
    seed is left as it is; the manifest is written last, so an interrupted write is redone.
    Returns the manifest.
    """
    folder = Path(folder)
    wanted = {"fingerprint": _fingerprint(source), "requested": {k: int(v) for k, v in tokens.items()},
              "seed": int(seed)}
    manifest_path = folder / MANIFEST
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if all(old.get(k) == v for k, v in wanted.items()):
            return old
        manifest_path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for i, (split, n) in enumerate(tokens.items()):
        docs = sample_documents(source, int(n), seed=np.random.SeedSequence([int(seed), i]).generate_state(1)[0])
        stream = np.concatenate(docs).astype(np.int32)
        text = "".join(document_text(source, doc) + "\n" for doc in docs)
        _atomic_write(folder / f"{split}.txt", lambda p: p.write_text(text, encoding="utf-8"))
        _atomic_write(folder / f"{split}.tokens.npy", _save_npy(stream))
        splits[split] = {"documents": len(docs), "tokens": int(len(stream))}
    _atomic_write(folder / SOURCE_FILE, _save_npz(transition=source.transition, words=np.array(source.words),
                                                 eos_id=np.array(source.eos_id)))
    _atomic_write(folder / "tokenizer.json", lambda p: word_tokenizer(source).save(str(p)))
    _atomic_write(folder / "tokenizer_config.json", lambda p: p.write_text(json.dumps({"eos_token": EOS})))
    manifest = {**wanted, "splits": splits, "N": source.N, "eos_id": source.eos_id}
    _atomic_write(manifest_path, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    return manifest


def load_source(folder: str | Path) -> MarkovSource:
    """The :class:`MarkovSource` of a corpus folder written by :func:`write_corpus`."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists() or not (folder / SOURCE_FILE).exists():
        raise HDLMError(f"synthetic corpus '{folder}' is missing or incomplete (no {MANIFEST}); write it again")
    with np.load(folder / SOURCE_FILE) as z:
        return MarkovSource(z["transition"], tuple(str(w) for w in z["words"]), int(z["eos_id"]))


def load_stream(folder: str | Path, split: str) -> np.ndarray:
    """The token stream of one split as the source sampled it (documents with their EOS, concatenated)."""
    path = Path(folder) / f"{split}.tokens.npy"
    if not path.exists():
        raise HDLMError(f"synthetic corpus '{folder}' has no split '{split}'")
    return np.load(path)


__all__ = ["MarkovSource", "random_markov_source", "sample_documents", "sequence_nll", "block_marginals",
           "reference_nll", "stationary", "entropy_rate", "allowed_fraction", "word_tokenizer", "document_text",
           "write_corpus", "load_source", "load_stream", "EOS", "UNK"]
