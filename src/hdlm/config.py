"""Typed, validated configuration.

One :class:`Config` describes a whole experiment: model, process, hyperschedule, objective,
data, training and sampling. It is validated when it is built (a bad value raises
:class:`~hdlm.errors.HDLMError` naming the dotted field and the allowed range), loaded from
YAML presets with dotted command-line overrides (``train.lr=3e-4``), and saved inside every
checkpoint so a run can be reproduced from its checkpoint alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import HDLMError

INF = math.inf


def _f(default: Any, *, lo: float | None = None, hi: float | None = None, choices: tuple | None = None,
       lo_open: bool = False, help: str = "") -> Any:
    """A dataclass field with validation metadata (inclusive range unless lo_open)."""
    meta = {"lo": lo, "hi": hi, "choices": choices, "lo_open": lo_open, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    """The DiT backbone (paper §2.3, App. B; DESIGN.md §4). vocab_size = N real tokens; MASK = N."""

    vocab_size: int = _f(0, lo=0, help="number of real tokens N (0: taken from the tokenizer)")
    length: int = _f(128, lo=1, help="sequence length d")
    n_layers: int = _f(4, lo=1)
    hidden: int = _f(256, lo=8)
    n_heads: int = _f(4, lo=1)
    mlp_ratio: int = _f(4, lo=1)
    cond_dim: int = _f(128, lo=8, help="width of the noise-level embedding for adaLN")
    dropout: float = _f(0.1, lo=0.0, hi=1.0)
    time_conditioning: bool = _f(True, help="adaLN-Zero on the per-token noise level (Table 1 (d) turns it off)")
    weighted_embedding: bool = _f(True, help="Eq. (12) weighted token embedding (gamma family)")
    tie_embeddings: bool = _f(False)
    configuration: str = _f("aligned", choices=("aligned", "shifted"), help="ALIGNED or SHIFTED (Fig. 5)")
    settled_attention: str = _f("causal", choices=("causal", "block"),
                                help="how settled tokens attend each other: token-causal or block-causal")
    pad_vocab_to: int = _f(64, lo=1, help="pad the output head to a multiple of this (speed)")
    # ---- backbone (docs/conversion.md): the DiT above, or a pretrained Hugging Face causal LM converted by
    # `hdlm convert` (hdlm.hf_backbone). With "hf" the HF config fixes the network and the DiT sizes above
    # (n_layers, hidden, n_heads, mlp_ratio, dropout, tie_embeddings, pad_vocab_to) are unused.
    backbone: str = _f("dit", choices=("dit", "hf"), help="dit (HDLMTransformer) or hf (a converted causal LM)")
    hf_config: Optional[dict] = _f(None, help="backbone hf: the HF model's config.json, as a mapping")
    hf_source: str = _f("", help="backbone hf: where the pretrained weights came from (a record)")

    @property
    def shift(self) -> int:
        """0 for ALIGNED (output i predicts token i), 1 for SHIFTED (output i predicts token i+1)."""
        return 1 if self.configuration == "shifted" else 0


@dataclass
class ProcessConfig:
    """The noising process (paper §2.2, §3.2, App. A)."""

    kind: str = _f("gamma", choices=("absorb", "uniform", "gamma", "epsilon", "mdlm"))
    gamma: float = _f(0.01, lo=0.0, hi=1.0, help="gamma-hybrid mix: 0 = absorb, 1 = uniform")
    epsilon: float = _f(0.01, lo=0.0, hi=1.0, lo_open=False, help="epsilon-hybrid substitution probability")
    lam: float = _f(1.0, lo=0.0, help="lambda of the HDCE weights, Eq. (9)")
    noise: str = _f("loglinear", choices=("loglinear", "linear", "geometric", "cosine"))
    noise_eps: float = _f(1e-3, lo=0.0, hi=1.0, lo_open=True)
    sigma_min: float = _f(1e-4, lo=0.0, lo_open=True)
    sigma_max: float = _f(20.0, lo=0.0, lo_open=True)


@dataclass
class ScheduleConfig:
    """The hyperschedule (paper §3.1)."""

    kind: str = _f("block", choices=("quench", "flat", "block", "slide"))
    width: Optional[int] = _f(None, lo=1, help="window width omega (block/slide); default d/4")
    rho: float = _f(1.0, lo=0.0, lo_open=True, help="generation rate rho (tokens per step)")
    steps: Optional[int] = _f(None, lo=1, help="flat: number of steps T (default d/rho)")


@dataclass
class ObjectiveConfig:
    """The whole objective, Eq. (10)."""

    beta1: float = _f(1.0, lo=0.0, help="weight of the cross-entropy on settled tokens")
    beta2: float = _f(1.0, lo=0.0, help="weight of the diffusion loss (DWDSE / HDCE) on active tokens")
    intervals: Optional[int] = _f(None, lo=1, help="denoising intervals per sequence (default ceil(d/omega))")


@dataclass
class DataConfig:
    """Training / validation data (App. E)."""

    dataset: str = _f("ptb", help="ptb | a local file (txt/jsonl/parquet) | hf:NAME[:CONFIG]")
    train_split: str = _f("train")
    valid_split: str = _f("valid")
    tokenizer: str = _f("gpt2", help="gpt2 | bert-base-uncased | path to a local HF tokenizer folder")
    text_field: str = _f("text")
    cache_dir: str = _f(".hdlm_cache", help="where tokenised shards are cached")
    num_proc: int = _f(1, lo=1)


@dataclass
class TrainConfig:
    """Optimisation (App. B.1)."""

    steps: int = _f(300, lo=1)
    batch_size: int = _f(16, lo=1, help="global batch size (sequences per optimizer step)")
    grad_accum: int = _f(1, lo=1)
    lr: float = _f(3e-4, lo=0.0, lo_open=True)
    lr_schedule: str = _f("cosine", choices=("cosine", "constant"))
    warmup: int = _f(50, lo=0)
    min_lr_ratio: float = _f(0.1, lo=0.0, hi=1.0)
    weight_decay: float = _f(0.0, lo=0.0)
    betas: list = _f([0.9, 0.98])
    grad_clip: float = _f(1.0, lo=0.0)
    ema: float = _f(0.0, lo=0.0, hi=1.0, help="EMA decay of the weights (0 = off)")
    seed: int = _f(0, lo=0)
    device: str = _f("auto", help="auto | cpu | cuda | cuda:K")
    dtype: str = _f("auto", choices=("auto", "fp32", "bf16"), help="auto = bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = _f(False)
    log_every: int = _f(10, lo=1)
    eval_every: int = _f(100, lo=1)
    eval_batches: int = _f(8, lo=1)
    save_every: int = _f(100, lo=1)
    out_dir: str = _f("runs/default")
    init_from: Optional[str] = _f(None, help="Stage 2: start from this checkpoint's weights (App. B.1)")
    fsdp: bool = _f(False, help="shard with FSDP instead of DDP when several processes run")


@dataclass
class SampleConfig:
    """Generation (paper §3.4, App. D)."""

    sampler: str = _f("auto", choices=("auto", "analytic", "euler", "ancestral", "acs", "posterior", "ar"))
    eta: float = _f(0.01, lo=0.0, hi=1.0, help="ACS correction strength")
    temperature: float = _f(1.0, lo=0.0, lo_open=True)
    top_k: int = _f(0, lo=0)
    top_p: float = _f(1.0, lo=0.0, hi=1.0, lo_open=True)
    num_samples: int = _f(4, lo=1)
    batch_size: int = _f(4, lo=1)
    seed: int = _f(0, lo=0)
    kv_cache: bool = _f(True)
    float64_gumbel: bool = _f(True, help="draw categorical samples in float64 (App. F.2)")


@dataclass
class Config:
    """A whole experiment."""

    model: ModelConfig = field(default_factory=ModelConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return _build(cls, d or {}, "")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, overrides: dict | list[str]) -> "Config":
        """A copy with dotted overrides applied (a dict {"train.lr": 1e-3} or ["train.lr=1e-3", ...])."""
        d = self.to_dict()
        for key, value in _parse_overrides(overrides).items():
            _set_dotted(d, key, value)
        return Config.from_dict(d)


# --------------------------------------------------------------------------------------------
# building and validation


def _type_of(cls: type, name: str) -> Any:
    return get_type_hints(cls)[name]


def _build(cls: type, d: dict, prefix: str) -> Any:
    if not isinstance(d, dict):
        raise HDLMError(f"config {prefix.rstrip('.') or 'root'}: expected a mapping, got {d!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise HDLMError(f"config: unknown field '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        tp = _type_of(cls, f.name)
        value = d[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(value, tp, f"{prefix}{f.name}")
    return cls(**kwargs)  # Config.__post_init__ validates the whole tree


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = get_origin(tp)
    if origin is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        tp = args[0]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise HDLMError(f"config {name} = {value!r}: must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise HDLMError(f"config {name} = {value!r}: must be an integer")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise HDLMError(f"config {name} = {value!r}: must be an integer") from None
        if not f.is_integer():
            raise HDLMError(f"config {name} = {value!r}: must be an integer")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise HDLMError(f"config {name} = {value!r}: must be a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise HDLMError(f"config {name} = {value!r}: must be a number") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise HDLMError(f"config {name} = {value!r}: must be a string")
        return str(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise HDLMError(f"config {name} = {value!r}: must be a mapping")
        return dict(value)
    if tp is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise HDLMError(f"config {name} = {value!r}: must be a list")
        return list(value)
    return value


def _check_field(obj: Any, f: dataclasses.Field, name: str) -> None:
    value = getattr(obj, f.name)
    meta = f.metadata
    if value is None or not meta:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise HDLMError(f"config {name} = {value!r}: must be one of {', '.join(map(str, choices))}")
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and math.isnan(value):
            raise HDLMError(f"config {name} = nan: must be a number")
        bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
        bad_hi = hi is not None and value > hi
        if bad_lo or bad_hi:
            left = "(" if lo_open else "["
            lo_s = "-inf" if lo is None else f"{lo:g}"
            hi_s = "inf)" if hi is None else f"{hi:g}]"
            raise HDLMError(f"config {name} = {value!r}: must be in {left}{lo_s}, {hi_s}")


def validate(cfg: Config) -> None:
    """Check every field's range and the cross-field rules; raise HDLMError on the first problem."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            _check_field(sub, f, f"{section.name}.{f.name}")
    m, s = cfg.model, cfg.schedule
    if m.hidden % m.n_heads:
        raise HDLMError(f"config model.hidden = {m.hidden}: must be divisible by model.n_heads = {m.n_heads}")
    if (m.hidden // m.n_heads) % 2:
        raise HDLMError(f"config model.hidden / model.n_heads = {m.hidden // m.n_heads}: must be even (rotary)")
    if s.width is not None and s.width > m.length:
        raise HDLMError(f"config schedule.width = {s.width}: must be in [1, model.length = {m.length}]")
    if len(cfg.train.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.train.betas):
        raise HDLMError(f"config train.betas = {cfg.train.betas}: must be two numbers in [0, 1)")


# --------------------------------------------------------------------------------------------
# YAML, presets and overrides

PRESET_DIR = Path(__file__).parent / "presets"


def _parse_overrides(overrides: dict | list[str] | None) -> dict:
    if not overrides:
        return {}
    if isinstance(overrides, dict):
        return dict(overrides)
    out = {}
    for item in overrides:
        if "=" not in item:
            raise HDLMError(f"override '{item}': expected section.field=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        if p not in node or not isinstance(node[p], dict):
            raise HDLMError(f"override '{key}': unknown section '{p}'")
        node = node[p]
    if parts[-1] not in node:
        raise HDLMError(f"override '{key}': unknown field '{parts[-1]}' in '{'.'.join(parts[:-1]) or 'root'}'")
    node[parts[-1]] = value


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


def load_config(preset_or_path: str | None = None, overrides: dict | list[str] | None = None) -> Config:
    """Load a preset name (see :func:`list_presets`) or a YAML file, then apply dotted overrides."""
    d: dict = {}
    if preset_or_path:
        path = Path(preset_or_path)
        if not path.suffix:
            path = PRESET_DIR / f"{preset_or_path}.yaml"
            if not path.exists():
                raise HDLMError(f"config preset '{preset_or_path}' not found (presets: {', '.join(list_presets())})")
        elif not path.exists():
            raise HDLMError(f"config file '{preset_or_path}' not found")
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise HDLMError(f"config file '{path}': not valid YAML ({str(e).splitlines()[0]})") from None
        if "base" in d:  # a preset may extend another one
            base = load_config(d.pop("base")).to_dict()
            d = _deep_merge(base, d)
    d = _deep_merge(Config().to_dict(), d)
    for key, value in _parse_overrides(overrides).items():
        _set_dotted(d, key, value)
    return Config.from_dict(d)
