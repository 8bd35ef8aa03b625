"""Typed, validated configuration (pydantic v2 dataclasses).

One :class:`Config` describes a whole experiment: model, process, hyperschedule, objective,
data, training and sampling. Every field has a type, a range and a description; a value out of
range (also nan / inf: ``allow_inf_nan=False``) raises :class:`~hdlm.errors.HDLMError` with one
line naming the dotted field, the allowed values and what the field is. Configs are loaded from
YAML presets with dotted command-line overrides (``train.lr=3e-4``; a typo gets a "did you
mean"), and saved inside every checkpoint so a run can be reproduced from its checkpoint alone.

The sections are (pydantic) dataclasses, so ``dataclasses.replace / asdict / fields`` work on
them and validate. This module imports neither torch nor any other part of hdlm: the CLI reads
the vocabularies below and the field descriptions for ``--help`` without loading torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from .errors import HDLMError

INF = math.inf

# The vocabularies of an experiment, in one place (the CLI reads them without importing torch).
SCHEDULE_KINDS = ("quench", "flat", "block", "slide")  # Fig. 2
WINDOWED_KINDS = ("block", "slide")  # the kinds with a window width omega
PROCESS_KINDS = ("absorb", "uniform", "gamma", "epsilon", "mdlm")
GAMMA_FAMILY = ("absorb", "uniform", "gamma")  # the score family (SEDD ratios)
NOISE_KINDS = ("loglinear", "linear", "geometric", "cosine")
SAMPLER_NAMES = ("auto", "analytic", "euler", "ancestral", "acs", "posterior", "ar")
DRAW_METHODS = ("cdf", "gumbel", "float32-gumbel")  # how samplers draw a token (App. F.2)
LOGGERS = ("none", "tensorboard", "wandb", "trackio")  # experiment trackers (hdlm.tracking)
DETOKENIZERS = ("none", "ptb", "wikitext", "lm1b", "lambada", "scientific_papers")  # SEDD / MDLM text rules
ESTIMATORS = ("discrete", "continuous", "continuous-bound")  # App. C.1: bound, Alg. 1 estimate, bound
VARIATIONAL_CHAINS = ("auto", "forward", "absorb")  # the discrete bound's noising chain q
PARAMETRISATIONS = ("subs", "sedd")  # how a gamma-family output is read (hdlm / SEDD and official)
VOCAB_LAYOUTS = ("hdlm", "official")  # embedding / head rows (official: N+1, no BOS)
ATTENTION_KINDS = ("sdpa", "explicit")  # explicit: the official computation written out

_PYDANTIC = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)


def _f(default: Any, description: str, **bounds: Any) -> Any:
    """A field with its description and bounds (gt / ge / lt / le)."""
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda: type(default)(default), description=description, **bounds)
    return Field(default, description=description, **bounds)


def _choice(values: tuple[str, ...]) -> Any:
    return Literal[values]  # Literal[("a", "b")] is Literal["a", "b"]


class _Section:
    """Shared checks of every section: no bool where a number is meant; "none" means None; lists from YAML text."""

    @field_validator("*", mode="before")
    @classmethod
    def _lenient(cls, value: Any, info) -> Any:
        tp = cls.__pydantic_fields__[info.field_name].annotation
        optional = get_origin(tp) is Union and type(None) in get_args(tp)
        base = next((a for a in get_args(tp) if a is not type(None)), tp) if optional else tp
        if optional and isinstance(value, str) and value.lower() in ("none", "null"):
            return None
        if base in (int, float) and isinstance(value, bool):
            raise ValueError("not a boolean")
        if get_origin(base) is list and isinstance(value, str):
            return yaml.safe_load(value)
        return value


def section(name: str):
    """Make ``cls`` a validating pydantic dataclass whose errors are one HDLMError line naming ``name.field``."""

    def wrap(cls):
        cls = dataclass(cls, config=_PYDANTIC)
        cls._section = name
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            try:
                init(self, *args, **kwargs)
            except ValidationError as e:
                raise _config_error(e, cls, name) from None

        cls.__init__ = __init__
        return cls

    return wrap


@section("model")
class ModelConfig(_Section):
    """The DiT backbone (paper §2.3, App. B; DESIGN.md §4). vocab_size = N real tokens; MASK = N."""

    vocab_size: int = _f(0, "number of real tokens N (0: taken from the tokenizer)", ge=0)
    length: int = _f(128, "sequence length d", ge=1)
    n_layers: int = _f(4, "number of transformer blocks", ge=1)
    hidden: int = _f(256, "hidden width (a multiple of n_heads, with an even head size for rotary)", ge=8)
    n_heads: int = _f(4, "attention heads", ge=1)
    mlp_ratio: int = _f(4, "MLP width / hidden", ge=1)
    cond_dim: int = _f(128, "width of the noise-level embedding for adaLN", ge=8)
    dropout: float = _f(0.1, "dropout probability", ge=0.0, le=1.0)
    time_conditioning: bool = _f(True, "adaLN-Zero on the per-token noise level (Table 1 (d) turns it off)")
    weighted_embedding: bool = _f(True, "Eq. (12) weighted token embedding (gamma family)")
    tie_embeddings: bool = _f(False, "share the token embedding and the output head")
    configuration: _choice(("aligned", "shifted")) = _f("aligned", "ALIGNED or SHIFTED (Fig. 5)")
    settled_attention: _choice(("causal", "block")) = _f(
        "causal", "how settled tokens attend each other: token-causal or block-causal")
    pad_vocab_to: int = _f(64, "pad the output head to a multiple of this (speed)", ge=1)
    # --- exact compatibility with the published ServiceNow/hdlm checkpoints: hdlm.official sets these
    # when it loads one (docs/checkpoints.md); hdlm's own models keep the defaults.
    vocab_layout: _choice(VOCAB_LAYOUTS) = _f(
        "hdlm", "token rows: hdlm (N+2 embedding rows, BOS included) or official (N+1 embedding rows, no BOS, "
                "and an N+1-row head with a MASK column)")
    norm_fp32: bool = _f(False, "LayerNorm computed in float32 whatever the model dtype, then times its weight")
    final_adaln: bool = _f(True, "adaLN modulation before the head when time-conditioned (official: none)")
    attention: _choice(ATTENTION_KINDS) = _f(
        "sdpa", "sdpa (fused) or explicit (the official softmax(q.k/sqrt(d)) written out: a query allowed "
                "no key attends uniformly)")
    rotary_buffer: bool = _f(False, "rotary inv_freq kept as a checkpoint buffer; angles in its dtype")

    # ---- backbone (docs/conversion.md): the DiT above, or a pretrained Hugging Face causal LM converted by
    # `hdlm convert` (hdlm.hf_backbone). With "hf" the HF config fixes the network and the DiT sizes above
    # (n_layers, hidden, n_heads, mlp_ratio, dropout, tie_embeddings, pad_vocab_to) are unused.
    backbone: _choice(("dit", "hf")) = _f("dit", "dit (HDLMTransformer) or hf (a converted causal LM)")
    hf_config: Optional[dict] = _f(None, "backbone hf: the HF model's config.json, as a mapping")
    hf_source: str = _f("", "backbone hf: where the pretrained weights came from (a record)")

    def __post_init__(self) -> None:
        if self.hidden % self.n_heads:
            raise HDLMError(f"config model.hidden = {self.hidden}: must be divisible by model.n_heads = {self.n_heads}")
        if (self.hidden // self.n_heads) % 2:
            raise HDLMError(f"config model.hidden / model.n_heads = {self.hidden // self.n_heads}: "
                            f"must be even (rotary)")
        if self.vocab_layout == "official" and (self.tie_embeddings or self.configuration != "aligned"):
            raise HDLMError("config model.vocab_layout = official: needs model.tie_embeddings = false and "
                            "model.configuration = aligned (the official layout has no BOS row)")

    @property
    def shift(self) -> int:
        """0 for ALIGNED (output i predicts token i), 1 for SHIFTED (output i predicts token i+1)."""
        return 1 if self.configuration == "shifted" else 0


@section("process")
class ProcessConfig(_Section):
    """The noising process (paper §2.2, §3.2, App. A)."""

    kind: _choice(PROCESS_KINDS) = _f("gamma", "noising process (§3.2): gamma-/epsilon-hybrid or a special case")
    gamma: float = _f(0.01, "gamma-hybrid mix: 0 = absorb, 1 = uniform", ge=0.0, le=1.0)
    epsilon: float = _f(0.01, "epsilon-hybrid substitution probability", ge=0.0, le=1.0)
    lam: float = _f(1.0, "lambda of the HDCE weights, Eq. (9)", ge=0.0, le=100.0)
    noise: _choice(NOISE_KINDS) = _f("loglinear", "scalar noise schedule sigma_bar(s) / alpha(s)")
    noise_eps: float = _f(1e-3, "loglinear/linear/cosine: alpha(1) = noise_eps", gt=0.0, lt=1.0)
    sigma_min: float = _f(1e-4, "geometric: sigma_bar(0)", gt=0.0, le=100.0)
    sigma_max: float = _f(20.0, "geometric: sigma_bar(1)", gt=0.0, le=1000.0)
    # --- how a gamma-family network output is read (hdlm.sedd_score; docs/checkpoints.md): "subs" = hdlm's
    # logits of the real token given it is not masked; "sedd" = SEDD / official scale_by_sigma log-ratios.
    parametrisation: _choice(PARAMETRISATIONS) = _f("subs", "gamma family: subs (hdlm) or sedd (official)")

    def __post_init__(self) -> None:
        if self.parametrisation == "sedd" and self.kind not in GAMMA_FAMILY:
            raise HDLMError(f"config process.parametrisation = sedd: only for the gamma family "
                            f"({', '.join(GAMMA_FAMILY)}), not process.kind = {self.kind}")


@section("schedule")
class ScheduleConfig(_Section):
    """The hyperschedule (paper §3.1)."""

    kind: _choice(SCHEDULE_KINDS) = _f("block", "hyperschedule of Fig. 2")
    width: Optional[int] = _f(None, "window width omega (block/slide); default d/4", ge=1)
    rho: float = _f(1.0, "generation rate rho (tokens per step)", gt=0.0, le=1e6)
    steps: Optional[int] = _f(None, "flat: number of steps T (default d/rho)", ge=1)


@section("objective")
class ObjectiveConfig(_Section):
    """The whole objective, Eq. (10)."""

    beta1: float = _f(1.0, "weight of the cross-entropy on settled tokens", ge=0.0, le=100.0)
    beta2: float = _f(1.0, "weight of the diffusion loss (DWDSE / HDCE) on active tokens", ge=0.0, le=100.0)
    intervals: Optional[int] = _f(None, "denoising intervals per sequence (default ceil(d/omega))", ge=1)


@section("data")
class DataConfig(_Section):
    """Training / validation data (App. E)."""

    dataset: str = _f("ptb", "ptb | a local file (txt/jsonl/parquet) | hf:NAME[:CONFIG]")
    train_split: str = _f("train", "split to train on")
    valid_split: str = _f("valid", "split to validate on")
    tokenizer: str = _f("gpt2", "gpt2 | bert-base-uncased | path to a local HF tokenizer folder")
    text_field: str = _f("text", "field / column holding the text (jsonl, parquet, HF datasets)")
    cache_dir: str = _f(".hdlm_cache", "where tokenised shards are cached")
    num_proc: int = _f(1, "processes for tokenising HF datasets", ge=1)
    detokenizer: _choice(DETOKENIZERS) = _f(
        "none", "SEDD/MDLM text rules applied to every document before tokenising (hdlm.evaluation.detokenize)")


@section("train")
class TrainConfig(_Section):
    """Optimisation (App. B.1)."""

    steps: int = _f(300, "optimizer steps", ge=1)
    batch_size: int = _f(16, "global batch size (sequences per optimizer step)", ge=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step", ge=1)
    lr: float = _f(3e-4, "peak learning rate of AdamW", gt=0.0, le=1.0)
    lr_schedule: _choice(("cosine", "constant")) = _f("cosine", "after warmup: cosine decay or constant")
    warmup: int = _f(50, "linear warmup steps", ge=0)
    min_lr_ratio: float = _f(0.1, "cosine: final lr / peak lr", ge=0.0, le=1.0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0.0, le=10.0)
    betas: list[float] = _f([0.9, 0.98], "AdamW betas: two numbers in [0, 1)")
    grad_clip: float = _f(1.0, "clip the gradient norm to this (0 = off)", ge=0.0, le=1e6)
    max_nonfinite_skips: int = _f(0, "steps with a non-finite loss or gradient norm to skip (not applied) "
                                     "before the run stops with an error", ge=0)
    ema: float = _f(0.0, "EMA decay of the weights (0 = off)", ge=0.0, le=1.0)
    seed: int = _f(0, "seed of every random draw of the run", ge=0)
    device: str = _f("auto", "auto | cpu | cuda | cuda:K")
    dtype: _choice(("auto", "fp32", "bf16")) = _f("auto", "auto = bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = _f(False, "torch.compile the model (<= 6% faster on CPU, DESIGN.md §9)")
    log_every: int = _f(10, "steps between metrics rows", ge=1)
    eval_every: int = _f(100, "steps between validations", ge=1)
    eval_batches: int = _f(8, "validation batches (fixed, with fixed seeds)", ge=1)
    save_every: int = _f(100, "steps between checkpoints", ge=1)
    out_dir: str = _f("runs/default", "run folder (checkpoints, metrics.jsonl, curves.png)")
    init_from: Optional[str] = _f(None, "Stage 2: start from this checkpoint's weights (App. B.1)")
    fsdp: bool = _f(False, "shard with FSDP instead of DDP when several processes run")
    logger: _choice(LOGGERS) = _f("none", "also log the metrics.jsonl rows to tensorboard, wandb (offline) or trackio")
    logger_project: str = _f("hdlm", "project name for wandb / trackio")

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise HDLMError(f"config train.betas = {self.betas}: must be two numbers in [0, 1)")


@section("sample")
class SampleConfig(_Section):
    """Generation (paper §3.4, App. D)."""

    sampler: _choice(SAMPLER_NAMES) = _f("auto", "auto: posterior (0<gamma<1), analytic (gamma 0 or 1), ancestral (epsilon), ar (quench)")
    eta: float = _f(0.01, "ACS correction strength", ge=0.0, le=1.0)
    temperature: float = _f(1.0, "sampling temperature (1 = off)", gt=0.0, le=100.0)
    top_k: int = _f(0, "keep the K most likely tokens (0 = off)", ge=0)
    top_p: float = _f(1.0, "nucleus sampling (1 = off)", gt=0.0, le=1.0)
    num_samples: int = _f(4, "number of samples", ge=1)
    batch_size: int = _f(4, "samples per batch", ge=1)
    seed: int = _f(0, "sampling seed", ge=0)
    kv_cache: bool = _f(True, "cache the settled tokens' keys/values (§3.3)")
    draw: _choice(DRAW_METHODS) = _f(
        "cdf", "token draws: exact float64 inverse CDF, float64 Gumbel-max, or the reference code's "
               "float32 Gumbel-max that lowers the entropy (App. F.2)")


SECTIONS: dict[str, type] = {"model": ModelConfig, "process": ProcessConfig, "schedule": ScheduleConfig,
                             "objective": ObjectiveConfig, "data": DataConfig, "train": TrainConfig,
                             "sample": SampleConfig}
# keys of older checkpoints' config.yaml -> how to read them today
LEGACY_KEYS = {("sample", "float64_gumbel"): lambda v: ("draw", "cdf" if _truthy(v) else "float32-gumbel")}


def _truthy(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("true", "1", "yes")


@section("")
class Config:
    """A whole experiment."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    process: ProcessConfig = Field(default_factory=ProcessConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        m, s = self.model, self.schedule
        if s.width is not None and s.width > m.length:
            raise HDLMError(f"config schedule.width = {s.width}: must be in [1, model.length = {m.length}]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise HDLMError(f"config: expected a mapping of sections, got {d!r}")
        return cls(**_upgraded(d))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, overrides: dict | list[str]) -> "Config":
        """A copy with dotted overrides applied (a dict {"train.lr": 1e-3} or ["train.lr=1e-3", ...])."""
        d = self.to_dict()
        for key, value in parse_overrides(overrides).items():
            _set_dotted(d, key, value)
        return Config.from_dict(d)


# --------------------------------------------------------------------------------------------
# errors: one line naming the dotted field, its allowed values and what it is


def _field_info(cls: type, name: str):
    return getattr(cls, "__pydantic_fields__", {}).get(name)


def _allowed(info) -> str:
    """What a field accepts, in words: "a number in (0, 1]", "one of a, b", "an integer >= 1"."""
    tp = info.annotation
    if get_origin(tp) is Union:
        tp = next(a for a in get_args(tp) if a is not type(None))
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, get_args(tp)))
    kind = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(tp, "a list")
    lo = hi = None
    for m in info.metadata:
        for attr, side in (("gt", "("), ("ge", "["), ("lt", ")"), ("le", "]")):
            if getattr(m, attr, None) is not None:
                if side in "([":
                    lo = (side, getattr(m, attr))
                else:
                    hi = (side, getattr(m, attr))
    if lo and hi:
        return f"{kind} in {lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f"{kind} {'>' if lo[0] == '(' else '>='} {lo[1]:g}"
    return kind


def did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"


def _config_error(e: ValidationError, cls: type, prefix: str) -> HDLMError:
    err = e.errors()[0]
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, HDLMError):  # a cross-field rule of a section
        return ctx_error
    loc = [str(p) for p in err["loc"]]
    owner = cls
    for part in loc[:-1]:  # walk down to the section that owns the field
        owner = SECTIONS.get(part, owner)
    dotted = ".".join(([prefix] if prefix else []) + loc)
    if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        known = [f.name for f in dataclasses.fields(owner)]
        return HDLMError(f"config: unknown field '{dotted}'" + did_you_mean(loc[-1], known))
    info = _field_info(owner, loc[-1]) if loc else None
    if info is None:
        return HDLMError(f"config {dotted or 'root'}: {err['msg']}")
    if owner is Config:
        return HDLMError(f"config {dotted} = {err.get('input')!r}: must be a mapping of {dotted}.* fields")
    return HDLMError(f"config {dotted} = {err.get('input')!r}: must be {_allowed(info)} ({info.description})")


def _upgraded(d: dict) -> dict:
    """Older config.yaml keys read as today's (``sample.float64_gumbel`` -> ``sample.draw``)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for (sec, key), convert in LEGACY_KEYS.items():
        if isinstance(out.get(sec), dict) and key in out[sec]:
            new_key, value = convert(out[sec].pop(key))
            out[sec].setdefault(new_key, value)
    return out


def field_help() -> str:
    """Every config field with its type / range, default and description (``hdlm train --help``)."""
    lines = []
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            info = _field_info(cls, f.name)
            default = info.get_default(call_default_factory=True)
            lines.append(f"  {sec}.{f.name} = {default!r}: {info.description} [{_allowed(info)}]")
    return "\n".join(lines)


def validate(cfg: Config) -> None:
    """Check every field and the cross-field rules again (a Config is validated when built)."""
    Config.from_dict(cfg.to_dict())


# --------------------------------------------------------------------------------------------
# YAML, presets and overrides

PRESET_DIR = Path(__file__).parent / "presets"


def parse_overrides(overrides: dict | list[str] | None) -> dict:
    """``["train.lr=1e-3", ...]`` (values parsed as YAML) or a dict -> {dotted key: value}."""
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    out = {}
    for item in overrides:
        if "=" not in item:
            raise HDLMError(f"override '{item}': expected section.field=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise HDLMError(f"override '{item}': the value is not valid YAML") from None
    return out


_parse_overrides = parse_overrides  # older name


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise HDLMError(f"override '{key}': unknown section '{parts[0]}'" + did_you_mean(parts[0], list(SECTIONS)))
    sec, name = parts
    if (sec, name) in LEGACY_KEYS:
        name, value = LEGACY_KEYS[(sec, name)](value)
    known = [f.name for f in dataclasses.fields(SECTIONS[sec])]
    if name not in known:
        raise HDLMError(f"override '{key}': unknown field '{name}' in '{sec}'" + did_you_mean(name, known))
    d.setdefault(sec, {})[name] = value


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(preset_or_path: str) -> dict:
    path = Path(preset_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{preset_or_path}.yaml"
        if not path.exists() and Path(preset_or_path).is_dir():
            raise HDLMError(f"config file '{preset_or_path}' is a folder, expected a YAML file or a preset name")
        if not path.exists():
            raise HDLMError(f"config preset '{preset_or_path}' not found (presets: {', '.join(list_presets())})")
    elif not path.exists():
        raise HDLMError(f"config file '{preset_or_path}' not found")
    if path.is_dir():
        raise HDLMError(f"config file '{path}' is a folder, expected a YAML file")
    try:
        d = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise HDLMError(f"config file '{path}': not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise HDLMError(f"config file '{path}' is not UTF-8 text (byte {e.start}): expected YAML") from None
    if not isinstance(d, dict):
        raise HDLMError(f"config file '{path}': expected a mapping of sections, got {type(d).__name__}")
    if "base" in d:  # a preset may extend another one
        d = _deep_merge(load_config(d.pop("base")).to_dict(), d)
    return d


def load_config(preset_or_path: str | None = None, overrides: dict | list[str] | None = None) -> Config:
    """Load a preset name (see :func:`list_presets`) or a YAML file, then apply dotted overrides."""
    d = _read_yaml(preset_or_path) if preset_or_path else {}
    d = _deep_merge(Config().to_dict(), _upgraded(d))
    for key, value in parse_overrides(overrides).items():
        _set_dotted(d, key, value)
    return Config.from_dict(d)
