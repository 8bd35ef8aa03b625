"""Official ServiceNow/hdlm checkpoints → hdlm: config, weights and tokenizer (docs/checkpoints.md).

A published repository holds ``config.json`` (the training config as a nested dict), the weights
(``model.safetensors`` and/or ``pytorch_model.bin``) and the GPT-2 tokenizer files. The official
classes read only a few config fields; this module reads exactly those, maps them to an hdlm
:class:`~hdlm.config.Config` whose model reproduces the official forward pass (the
``vocab_layout``/``norm_fp32``/``final_adaln``/``attention``/``rotary_buffer`` model
options and the ``sedd`` parametrisation of the γ process), and refuses with one
:class:`~hdlm.errors.HDLMError` line anything hdlm cannot represent exactly.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import _load_safetensors, _one_line
from ..config import Config
from ..errors import HDLMError
from ..tokenizers import from_path, load_tokenizer

#: official ``model_type`` → hdlm family
FAMILIES = {"epsilon_hybrid": "epsilon", "gamma_hybrid": "gamma"}
#: sampling methods whose post-processing rewrites next-token logits at inference
_AR_METHODS = ("AR", "AR_BAD", "AR_SCRATCH")
_SETTLED_ATTENTION = {"block_causal": "block", "causal": "causal"}
#: the official γ noise: LogLinearNoise() with its eps hard-coded (config sigma_min/max are ignored)
GAMMA_NOISE_EPS = 5e-3
_MISSING = object()


def is_official_config(d: Any) -> bool:
    """Whether a parsed ``config.json`` is an official checkpoint's (its ``model_type``)."""
    return isinstance(d, dict) and d.get("model_type") in FAMILIES


def read_official_config(folder: Path) -> dict:
    f = Path(folder) / "config.json"
    if not f.is_file():
        raise HDLMError(f"checkpoint {folder}: missing file config.json")
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HDLMError(f"checkpoint file {f} is not valid JSON ({str(e).splitlines()[0]})") from None
    if not is_official_config(d):
        raise HDLMError(f"checkpoint file {f}: model_type {d.get('model_type')!r} is neither "
                        f"{' nor '.join(FAMILIES)} (not an official hdlm checkpoint)")
    return d


# --------------------------------------------------------------------------------------------
# config


def _get(d: dict, dotted: str, default: Any = _MISSING, source: str = "config.json") -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _MISSING:
                raise HDLMError(f"official {source}: missing field {dotted}")
            return default
        node = node[part]
    return node


def _refuse(source: str, what: str) -> HDLMError:
    return HDLMError(f"official {source}: {what} has no exact hdlm equivalent")


def _schedule(d: dict, length: int, source: str) -> dict:
    """``annealing`` → hdlm hyperschedule: block(ω, τ) has 𝒯 = τ − 1 levels (ρ = ω/(τ − 1)).

    The official sampler visits the noise grid t_k = 10ε + k (1 − 20ε)/(τ − 1), k = τ−1 … 0, then
    one cleaning call at t = 10ε; hdlm's grid is s = k/(τ − 1) and its last step denoises.
    No annealing (``type`` none / null / absent) is full diffusion: hdlm's flat.
    """
    kind = _get(d, "annealing.type", None, source)
    if kind in (None, "none", "None", "null"):
        return {"kind": "flat"}
    if kind != "block":
        raise _refuse(source, f"annealing.type = {kind!r} (hdlm maps block and none)")
    width = int(_get(d, "annealing.width", source=source))
    tau = _get(d, "annealing.eval_tau", None, source)
    tau = int(tau if tau is not None else _get(d, "annealing.tau", source=source))
    if tau < 2 or not 1 <= width <= length:
        raise _refuse(source, f"annealing block width = {width}, tau = {tau} (need tau >= 2, 1 <= width <= "
                              f"model.length = {length})")
    return {"kind": "block", "width": width, "rho": float(Fraction(width, tau - 1))}


def _settled_attention(d: dict, source: str) -> str:
    context = _get(d, "annealing.attention.context_type", "block_causal", source)
    block = _get(d, "annealing.attention.block_type", "full", source)
    if context not in _SETTLED_ATTENTION or block != "full":
        raise _refuse(source, f"annealing.attention context_type = {context!r}, block_type = {block!r} "
                              f"(hdlm: block_causal or causal, with full)")
    return _SETTLED_ATTENTION[context]


def _check_model_flags(d: dict, family: str, source: str) -> None:
    m = _get(d, "model", source=source)
    flags = {k: bool(m.get(k, False)) for k in ("transformer_sigma_conditioning", "use_timestep_embedding",
                                                 "scale_by_sigma", "post_process_logits")}
    if flags["post_process_logits"] and _get(d, "annealing.sampling_method", "SAR", source) in _AR_METHODS:
        raise _refuse(source, "model.post_process_logits with annealing.sampling_method "
                              f"{_get(d, 'annealing.sampling_method', source=source)!r} (rewrites next-token logits)")
    conditioned = flags["transformer_sigma_conditioning"], flags["use_timestep_embedding"]
    if family == "epsilon" and any(conditioned):
        raise _refuse(source, "an epsilon model with transformer_sigma_conditioning / use_timestep_embedding")
    if family == "gamma":
        if not all(conditioned):
            raise _refuse(source, "a gamma model without transformer_sigma_conditioning and use_timestep_embedding")
        if not flags["scale_by_sigma"]:
            raise _refuse(source, "a gamma model with model.scale_by_sigma = false")
    kind = str(d.get("type", "aligned"))
    if "shifted" in kind:
        raise _refuse(source, f"type = {kind!r} (the official SHIFTED convention, BOS = EOS at position 0)")


def _process(d: dict, family: str, source: str) -> dict:
    if family == "gamma":
        graph = _get(d, "graph.type", source=source)
        if graph != "QGamma":
            raise _refuse(source, f"graph.type = {graph!r} (published gamma models use QGamma)")
        noise = _get(d, "noise.type", "loglinear", source)
        if noise != "loglinear":
            raise _refuse(source, f"noise.type = {noise!r} (hdlm maps loglinear)")
        return {"kind": "gamma", "gamma": float(_get(d, "graph.gamma", source=source)), "noise": "loglinear",
                "noise_eps": GAMMA_NOISE_EPS, "parametrisation": "sedd"}
    standard = _get(d, "training.loss_type", "hybrid", source) == "standard"  # the MDLM loss: epsilon = 0
    return {"kind": "epsilon", "epsilon": 0.0 if standard else float(_get(d, "training.epsilon", 0.01, source)),
            "lam": float(_get(d, "training.lambda", 1.0, source)), "noise": "linear",
            "noise_eps": float(_get(d, "annealing.sampling_eps", 1e-4, source))}


def config_from_official(d: dict, source: str = "config.json") -> Config:
    """The hdlm Config of an official ``config.json`` (what ``HDLM`` / ``HDLM_Gamma`` read).

    Read: ``model_type``, ``tokenizer.tokens``, ``type``, ``graph.type/gamma``, ``noise.type``,
    ``training.{epsilon, lambda, loss_type}``, ``model.{hidden_size, n_heads, n_blocks, cond_dim, dropout,
    length, transformer_sigma_conditioning, use_timestep_embedding, hybrid_sigma_embedding,
    scale_by_sigma, post_process_logits}``, ``annealing.{type, width, tau, eval_tau, sampling_method,
    sampling_eps, attention}``, ``sampling.predictor``. Everything else (optimizer, data paths, …) is
    the official training setup and is not needed to run the model.
    """
    if not is_official_config(d):
        raise HDLMError(f"official {source}: model_type {d.get('model_type')!r} is not one of {', '.join(FAMILIES)}")
    family = FAMILIES[d["model_type"]]
    _check_model_flags(d, family, source)
    tokens = d["tokenizer"]["tokens"] if isinstance(d.get("tokenizer"), dict) and "tokens" in d["tokenizer"] \
        else _get(d, "tokens", source=source)
    m = _get(d, "model", source=source)
    length = int(_get(d, "model.length", source=source))
    gamma = family == "gamma"
    predictor = str(_get(d, "sampling.predictor", "analytic", source)) if gamma else "auto"
    tree = {
        "model": {"vocab_size": int(tokens), "length": length, "n_layers": int(_get(d, "model.n_blocks", source=source)),
                  "hidden": int(_get(d, "model.hidden_size", source=source)),
                  "n_heads": int(_get(d, "model.n_heads", source=source)), "mlp_ratio": 4,
                  "cond_dim": int(_get(d, "model.cond_dim", 128, source)), "dropout": float(m.get("dropout", 0.1)),
                  "time_conditioning": gamma, "weighted_embedding": gamma and bool(m.get("hybrid_sigma_embedding")),
                  "tie_embeddings": False, "configuration": "aligned",
                  "settled_attention": _settled_attention(d, source), "pad_vocab_to": 1,
                  "vocab_layout": "official", "norm_fp32": True, "final_adaln": False,
                  "attention": "explicit", "rotary_buffer": True},
        "process": _process(d, family, source),
        "schedule": _schedule(d, length, source),
        "sample": {"sampler": predictor if predictor in ("analytic", "euler") else "auto"},
        "data": {"tokenizer": "gpt2"},
    }
    base = Config().to_dict()
    for section, values in tree.items():
        base[section].update(values)
    try:
        return Config.from_dict(base)
    except HDLMError as e:
        raise HDLMError(f"official {source}: {e}") from None


# --------------------------------------------------------------------------------------------
# weights


def _key_map(cfg: Config) -> dict[str, str]:
    """Official state-dict key → hdlm key, for every tensor either model has."""
    keys = {"vocab_embed.embedding": "token_embedding", "rotary_emb.inv_freq": "rotary_inv_freq",
            "output_layer.norm_final.weight": "norm_final.weight",
            "output_layer.linear.weight": "head.weight", "output_layer.linear.bias": "head.bias"}
    for i in range(cfg.model.n_layers):
        o, h = f"blocks.{i}.", f"blocks.{i}."
        keys.update({o + "norm1.weight": h + "norm1.weight", o + "attn_qkv.weight": h + "qkv.weight",
                     o + "attn_out.weight": h + "proj.weight", o + "norm2.weight": h + "norm2.weight"})
        for j in ("0", "2"):
            for p in ("weight", "bias"):
                keys[f"{o}mlp.{j}.{p}"] = f"{h}mlp.{j}.{p}"
        if cfg.model.time_conditioning:
            for p in ("weight", "bias"):
                keys[f"{o}adaLN_modulation.{p}"] = f"{h}adaLN.{p}"
    if cfg.model.time_conditioning:
        for j in ("0", "2"):
            for p in ("weight", "bias"):
                keys[f"sigma_map.mlp.{j}.{p}"] = f"noise_embedding.mlp.{j}.{p}"
    return keys


def convert_state_dict(state: dict[str, Tensor], cfg: Config, source: str | Path) -> dict[str, Tensor]:
    """Official weights renamed to hdlm's; any missing or unexpected key is one HDLMError line.

    (The official loader uses ``strict=False``, which silently leaves such weights random.)
    """
    mapping = _key_map(cfg)
    missing = [k for k in mapping if k not in state]
    unexpected = [k for k in state if k not in mapping]
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        family = "gamma_hybrid" if cfg.model.time_conditioning else "epsilon_hybrid"
        raise HDLMError(f"weights in {source} do not fit the official {family} model "
                        f"({what}; {len(missing)} missing, {len(unexpected)} unexpected)")
    return {mapping[k]: t for k, t in state.items()}


def read_official_weights(folder: Path) -> tuple[dict[str, Tensor], Path]:
    """The state dict of an official folder: ``model.safetensors``, else ``pytorch_model.bin``
    (read with ``weights_only=True``: no code runs). Returns (state, file)."""
    folder = Path(folder)
    st, binf = folder / "model.safetensors", folder / "pytorch_model.bin"
    if st.is_file():
        return _load_safetensors(st), st
    if not binf.is_file():
        raise HDLMError(f"checkpoint {folder}: no weights (neither model.safetensors nor pytorch_model.bin)")
    try:
        state = torch.load(binf, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle that is not plain tensors, ...
        raise HDLMError(f"checkpoint file {binf} is corrupt or unreadable ({_one_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise HDLMError(f"checkpoint file {binf} does not hold a state dict of tensors")
    return state, binf


# --------------------------------------------------------------------------------------------
# tokenizer and the whole model


def official_tokenizer(folder: Path, cfg: Config):
    """The repo's tokenizer (``tokenizer.json``), else hdlm's bundled GPT-2; its vocabulary size
    must equal the official ``tokenizer.tokens``."""
    folder = Path(folder)
    n = cfg.model.vocab_size
    if (folder / "tokenizer.json").is_file():
        tok = from_path(folder)
        where = f"{folder / 'tokenizer.json'}"
    else:
        tok = load_tokenizer("gpt2")
        where = "hdlm's bundled GPT-2 tokenizer (the repo ships none)"
    if tok.vocab_size != n:
        raise HDLMError(f"tokenizer mismatch: {where} has N = {tok.vocab_size} tokens but the checkpoint's "
                        f"tokenizer.tokens = {n}")
    return tok


def read_official(folder: Path) -> tuple[Config, dict[str, Tensor], Path]:
    """(Config, weights renamed to hdlm's, weights file) of an official checkpoint folder;
    :func:`hdlm.hub.load_official` builds the model from them."""
    folder = Path(folder)
    cfg = config_from_official(read_official_config(folder), source=str(folder / "config.json"))
    state, file = read_official_weights(folder)
    return cfg, convert_state_dict(state, cfg, file), file
