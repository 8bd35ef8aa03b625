"""The one sample format (issue #12 item 9): written by ``hdlm sample``, read by ``hdlm eval gen``.

A samples file is JSONL, one sample per line, with the keys of :data:`SAMPLE_KEYS`::

    {"text": "...", "token_ids": [..], "prompt_length": 1,
     "sampler": {"name": "analytic", "eta": 0.01, "temperature": 1.0, ..., "hyperschedule": {...}},
     "seed": 0, "checkpoint": "<sha256 of the weights file>"}

Only ``text`` is required when reading (human reference text in the same format); every other
key, when present, must have its type. A plain ``.txt`` file (one sample per blank-line-separated
block) is also read; any other file name (``.json`` included) is refused with one line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from .errors import HDLMError

SAMPLE_KEYS = ("text", "token_ids", "prompt_length", "sampler", "seed", "checkpoint")
SAMPLES_SUFFIX = ".jsonl"
TEXT_SUFFIX = ".txt"
_TYPES: dict[str, tuple[type, ...]] = {"text": (str,), "token_ids": (list,), "prompt_length": (int,),
                                       "sampler": (dict,), "seed": (int,), "checkpoint": (str,)}


def sample_records(texts: Sequence[str], token_ids: Sequence[Sequence[int]], *, prompt_length: int,
                   sampler: dict[str, Any], seed: int, checkpoint: str | None) -> list[dict[str, Any]]:
    """One record per sample, with the keys of :data:`SAMPLE_KEYS` in that order."""
    if len(texts) != len(token_ids):
        raise HDLMError(f"{len(texts)} texts but {len(token_ids)} token-id rows")
    return [{"text": text, "token_ids": [int(i) for i in ids], "prompt_length": int(prompt_length),
             "sampler": dict(sampler), "seed": int(seed), "checkpoint": checkpoint}
            for text, ids in zip(texts, token_ids)]


def dumps_samples(records: Sequence[dict[str, Any]]) -> str:
    """The JSONL text of ``records`` (one line each, a final newline)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_samples(path: str | Path, records: Sequence[dict[str, Any]]) -> Path:
    """Write ``records`` as JSONL to ``path`` (folders created); one line on failure."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps_samples(records), encoding="utf-8")
    except OSError as e:
        raise HDLMError(f"cannot write '{path}': {e.strerror or e}") from None
    return path


def _check_record(path: Path, n: int, obj: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(obj.get("text"), str):
        raise HDLMError(f"{path}:{n}: expected a sample object with a string 'text' field (keys "
                        f"{', '.join(SAMPLE_KEYS)}; `hdlm sample --out FILE.jsonl` writes them)")
    for key, types in _TYPES.items():
        value = obj.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            raise HDLMError(f"{path}:{n}: '{key}' must be a {types[0].__name__}, got {type(value).__name__}")
    ids = obj.get("token_ids")
    if ids is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise HDLMError(f"{path}:{n}: 'token_ids' must be a list of integers")
    return {key: obj.get(key) for key in SAMPLE_KEYS}


def read_samples(path: str | Path) -> list[dict[str, Any]]:
    """Sample records (every key of :data:`SAMPLE_KEYS`, None where absent) from a ``.jsonl``
    samples file or a ``.txt`` file of blank-line-separated texts."""
    path = Path(path)
    if not path.is_file():
        raise HDLMError(f"samples file '{path}' not found")
    if path.suffix == SAMPLES_SUFFIX:
        from .data import iter_jsonl

        records = [_check_record(path, n, obj) for n, obj in iter_jsonl(path)]
    elif path.suffix == TEXT_SUFFIX:
        try:
            blocks = re.split(r"\n[ \t]*\n", path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise HDLMError(f"samples file '{path}' is not UTF-8 text (byte {e.start})") from None
        records = [dict(dict.fromkeys(SAMPLE_KEYS), text=b.strip("\n")) for b in blocks if b.strip()]
    else:
        raise HDLMError(f"samples file '{path}': expected a {SAMPLES_SUFFIX} file (one sample per line, as "
                        f"`hdlm sample --out FILE.jsonl` writes) or a {TEXT_SUFFIX} file of texts")
    if not records:
        raise HDLMError(f"samples file '{path}' holds no samples")
    return records
