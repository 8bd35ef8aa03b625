"""Evaluation data by name: ``--data`` specs and the zero-shot sets of Table 3 (SEDD / MDLM lists)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import DETOKENIZERS
from ..errors import HDLMError

# friendly zero-shot names (Table 3; SEDD / MDLM lists) -> (source spec, text field, detokenizer of the
# reference pipelines, hdlm.detokenize)
ZERO_SHOT = {
    "ptb": ("ptb", "text", "ptb"),
    "wikitext103": ("hf:wikitext:wikitext-103-raw-v1", "text", "wikitext"),
    "wikitext2": ("hf:wikitext:wikitext-2-raw-v1", "text", "wikitext"),
    "lm1b": ("hf:lm1b", "text", "lm1b"),
    "lambada": ("hf:EleutherAI/lambada_openai", "text", "lambada"),
    "ag_news": ("hf:ag_news", "text", "none"),
    "pubmed": ("hf:scientific_papers:pubmed", "article", "scientific_papers"),
    "arxiv": ("hf:scientific_papers:arxiv", "article", "scientific_papers"),
    "openwebtext": ("hf:openwebtext", "text", "none"),
    "owt": ("hf:openwebtext", "text", "none"),
}
SPLIT_NAMES = ("train", "valid", "validation", "val", "test")
DETOKENIZE_CHOICES = ("auto", *DETOKENIZERS)


def reference_detokenizer(spec: str) -> str:
    """The detokenizer SEDD / MDLM apply to the source ``spec`` (a resolved ``data.dataset``), or "none"."""
    return next((detok for source, _, detok in ZERO_SHOT.values() if source == spec), "none")


def chosen_detokenizer(spec: str, data_cfg, detokenize: str = "auto") -> str:
    """``detokenize`` unless "auto"; auto: the reference detokenizer of ``spec`` when it is zero-shot data
    (not the dataset the checkpoint trained on), else the checkpoint's own ``data.detokenizer``."""
    if detokenize not in DETOKENIZE_CHOICES:
        raise HDLMError(f"--detokenize {detokenize}: must be one of {', '.join(DETOKENIZE_CHOICES)}")
    if detokenize != "auto":
        return detokenize
    if spec == data_cfg.dataset:
        return getattr(data_cfg, "detokenizer", "none")
    return reference_detokenizer(spec)


def resolve_data_spec(spec: str, data_cfg, detokenize: str = "auto") -> tuple[Any, str, str]:
    """``ptb:test`` | a local file[:SPLIT] | ``hf:NAME[:CONFIG][:SPLIT]`` | a zero-shot name[:SPLIT]
    (wikitext103, wikitext2, lm1b, lambada, ag_news, pubmed, arxiv, openwebtext) → (DataConfig, split, label).

    The detokenizer is chosen by :func:`chosen_detokenizer` (Table 3 evaluates zero-shot data with the
    SEDD / MDLM rules); the label names it when one is applied.
    """
    spec = spec.strip()
    if not spec:
        raise HDLMError("--data is empty: use ptb:test, a local file, hf:NAME[:CONFIG]:SPLIT or a zero-shot name")
    split = "test"
    head, _, tail = spec.rpartition(":")
    if head and tail in SPLIT_NAMES:
        spec, split = head, tail
    text_field = data_cfg.text_field
    if spec.lower() in ZERO_SHOT:
        spec, text_field, _ = ZERO_SHOT[spec.lower()]
    detok = chosen_detokenizer(spec, data_cfg, detokenize)
    label = f"{spec}:{split}" + (f" (detokenized: {detok})" if detok != "none" else "")
    return dataclasses.replace(data_cfg, dataset=spec, text_field=text_field, detokenizer=detok), split, label
