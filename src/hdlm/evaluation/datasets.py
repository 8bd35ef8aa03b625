"""Evaluation data by name: ``--data`` specs and the zero-shot sets of Table 3 (SEDD / MDLM lists)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import HDLMError

# friendly zero-shot names (Table 3; SEDD / MDLM lists) -> (source spec, text field)
ZERO_SHOT = {
    "ptb": ("ptb", "text"),
    "wikitext103": ("hf:wikitext:wikitext-103-raw-v1", "text"),
    "wikitext2": ("hf:wikitext:wikitext-2-raw-v1", "text"),
    "lm1b": ("hf:lm1b", "text"),
    "lambada": ("hf:EleutherAI/lambada_openai", "text"),
    "ag_news": ("hf:ag_news", "text"),
    "pubmed": ("hf:scientific_papers:pubmed", "article"),
    "arxiv": ("hf:scientific_papers:arxiv", "article"),
    "openwebtext": ("hf:openwebtext", "text"),
    "owt": ("hf:openwebtext", "text"),
}
SPLIT_NAMES = ("train", "valid", "validation", "val", "test")


def resolve_data_spec(spec: str, data_cfg) -> tuple[Any, str, str]:
    """``ptb:test`` | a local file[:SPLIT] | ``hf:NAME[:CONFIG][:SPLIT]`` | a zero-shot name[:SPLIT]
    (wikitext103, wikitext2, lm1b, lambada, ag_news, pubmed, arxiv, openwebtext) → (DataConfig, split, label)."""
    spec = spec.strip()
    if not spec:
        raise HDLMError("--data is empty: use ptb:test, a local file, hf:NAME[:CONFIG]:SPLIT or a zero-shot name")
    split = "test"
    head, _, tail = spec.rpartition(":")
    if head and tail in SPLIT_NAMES:
        spec, split = head, tail
    text_field = data_cfg.text_field
    if spec.lower() in ZERO_SHOT:
        spec, text_field = ZERO_SHOT[spec.lower()]
    return dataclasses.replace(data_cfg, dataset=spec, text_field=text_field), split, f"{spec}:{split}"
