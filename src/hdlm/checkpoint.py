"""Checkpoints: crash-safe training state and weights-only "pretrained" folders.

A *checkpoint* is a folder ``run_dir/step-00001000/`` holding

- ``model.safetensors``: the model weights (``ema.safetensors`` too when EMA is on),
- ``config.yaml``: the resolved :class:`~hdlm.config.Config` (vocab_size filled in); it is the
  config that is read when present (a hand edit wins),
- ``config.json``: the same config for the Hugging Face Hub (``{"hdlm_format", "hdlm_version",
  "config", "tokenizer"}``), read when there is no ``config.yaml``,
- ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``: the whole tokenizer
  (``tokenizers`` and ``transformers.AutoTokenizer`` load the folder), so the folder samples on
  its own; older checkpoints hold only the tokenizer identity in ``tokenizer.json``, and load the
  tokenizer by name as before,
- ``state.pt``: the rest of the training state (optimizer, LR scheduler, EMA bookkeeping, step,
  RNG states, data-iterator position, metrics so far),
- ``meta.json``: hdlm version, step, time, the tokenizer identity and the sha256 of every binary file.

Writes are atomic: everything goes into a hidden temporary folder beside the target, each file is
fsynced, the folder is renamed into place, and only then is ``run_dir/latest`` (the name of the
newest checkpoint) replaced with :func:`os.replace`. A crash at any point leaves the previous
checkpoint and ``latest`` intact; stale temporary folders are ignored and removed by the next save.
This is what makes resume exact instead of "silently restart the optimizer" (DESIGN.md §11).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from ._version import __version__
from .config import Config
from .errors import HDLMError
from .faults import crash_point
from .run_folder import (LATEST, META_FILE, TMP_PREFIX, _clean_temporaries, _fsync_dir, _prune, _write_file,  # noqa: F401
                         _write_latest, list_checkpoints, read_latest, step_dir_name)
from .runtime import from_weights_only, to_weights_only

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.yaml"
HUB_CONFIG_FILE = "config.json"
HUB_FORMAT = 1  # the "hdlm_format" of config.json
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "state.pt"


@dataclass
class Checkpoint:
    """A loaded checkpoint (weights on ``map_location``)."""

    path: Path
    step: int
    config: Config
    tokenizer: dict
    model_state: dict[str, Tensor]
    ema_state: dict[str, Tensor] | None = None
    train_state: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# small helpers


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
            model = model.module
        else:
            return model


def weights_for_saving(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU copies; tensors that share storage (tied embeddings) get their own copy,
    because safetensors refuses shared tensors and ``load_state_dict`` fills both names anyway."""
    out, seen = {}, set()
    for name, t in state.items():
        t = t.detach()
        if hasattr(t, "full_tensor"):  # a DTensor (FSDP) that was not gathered
            t = t.full_tensor()
        t = t.to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_safetensors(path: Path, state: dict[str, Tensor]) -> None:
    from safetensors.torch import save

    data = save(weights_for_saving(state))
    _write_file(path, lambda f: f.write(data))


def _load_safetensors(path: Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise HDLMError(f"checkpoint file {path} is corrupt or unreadable ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# --------------------------------------------------------------------------------------------
# writing


def _write_folder(folder: Path, weights: dict[str, Tensor], cfg: Config, tokenizer: Any,
                  ema: dict[str, Tensor] | None, state: dict | None, step: int) -> None:
    """Fill ``folder`` (a fresh temporary folder); meta.json, holding the hashes, comes last."""
    _save_safetensors(folder / MODEL_FILE, weights)
    crash_point(f"write-{step}")
    if ema is not None:
        _save_safetensors(folder / EMA_FILE, ema)
    _write_file(folder / CONFIG_FILE, lambda f: f.write(cfg.to_yaml()), binary=False)
    identity = write_tokenizer(folder, tokenizer, cfg)
    _write_file(folder / HUB_CONFIG_FILE, lambda f: json.dump(hub_config(cfg, identity), f, indent=1), binary=False)
    if state is not None:
        buf = io.BytesIO()
        torch.save(to_weights_only(state), buf)
        _write_file(folder / STATE_FILE, lambda f: f.write(buf.getvalue()))
    files = [MODEL_FILE] + ([EMA_FILE] if ema is not None else []) + ([STATE_FILE] if state is not None else [])
    meta = {
        "hdlm_version": __version__,
        "step": int(step),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": identity,
        "sha256": {name: sha256_file(folder / name) for name in files},
    }
    _write_file(folder / META_FILE, lambda f: json.dump(meta, f, indent=1), binary=False)
    _fsync_dir(folder)


def _publish(tmp: Path, final: Path) -> None:
    """Rename a complete temporary folder to ``final`` (replacing an older folder of that name)."""
    if final.exists():
        trash = final.parent / f"{TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


def _write_atomically(final: Path, *folder_args: Any) -> None:
    """:func:`_write_folder` into a temporary folder beside ``final``, then rename it into place."""
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_folder(tmp, *folder_args)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module | dict[str, Tensor], cfg: Config,
                    tokenizer_identity: Any, train_state: dict, *, ema: dict[str, Tensor] | None = None,
                    keep: int = 2) -> Path:
    """Atomically write the checkpoint of ``step`` into ``run_dir`` and point ``latest`` at it.

    ``tokenizer_identity``: the :class:`~hdlm.tokenizers.Tokenizer` (written whole, so the folder
    samples on its own) or, as older callers pass, its identity dict;
    ``model`` is a module (wrappers are removed) or an already gathered state dict (FSDP);
    ``ema`` the EMA weights as a full model state dict (written to ``ema.safetensors``);
    ``keep`` the number of newest checkpoints to keep (older ones are deleted after the switch).
    Returns the checkpoint folder.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(run_dir)
    weights = model if isinstance(model, dict) else unwrap_model(model).state_dict()
    final = run_dir / step_dir_name(step)
    _write_atomically(final, weights, cfg, tokenizer_identity, ema, dict(train_state, step=int(step)), step)
    _write_latest(run_dir, final.name)
    _prune(run_dir, keep, step)
    return final


def save_pretrained(model: nn.Module | dict[str, Tensor], cfg: Config, tokenizer_identity: Any,
                    out_dir: str | Path, *, ema: dict[str, Tensor] | None = None) -> Path:
    """Weights + config + tokenizer only (no training state), for sampling and sharing: the
    Hub-native folder :func:`hdlm.hub.load_pretrained` reads (``tokenizer_identity`` as in
    :func:`save_checkpoint`; None writes no tokenizer).

    The EMA weights are the ones saved when given, since the paper evaluates the EMA model.
    The folder is written atomically like a checkpoint.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    weights = ema if ema is not None else (model if isinstance(model, dict) else unwrap_model(model).state_dict())
    _write_atomically(out_dir, weights, cfg, tokenizer_identity, None, None, 0)
    return out_dir


# --------------------------------------------------------------------------------------------
# reading


def resolve_checkpoint(path_or_run_dir: str | Path) -> Path:
    """A checkpoint folder from itself or from a run folder (via ``latest``, else the newest one)."""
    path = Path(path_or_run_dir)
    if not path.exists():
        raise HDLMError(f"checkpoint '{path}' not found")
    if not path.is_dir():
        raise HDLMError(f"checkpoint '{path}' is not a folder")
    if any((path / name).exists() for name in (META_FILE, MODEL_FILE, HUB_CONFIG_FILE, "pytorch_model.bin")):
        return path
    latest = read_latest(path)
    ckpts = list_checkpoints(path)
    if latest is not None and latest.is_dir():
        return latest
    if ckpts:  # no `latest`, or a crash while an existing folder of that name was being replaced
        return ckpts[-1]
    if latest is not None:
        raise HDLMError(f"checkpoint '{latest}' named by {path / LATEST} not found")
    raise HDLMError(f"no checkpoint in '{path}' (neither a checkpoint folder nor a run folder with '{LATEST}')")


def _read_meta(path: Path) -> dict:
    f = path / META_FILE
    if not f.exists():
        raise HDLMError(f"checkpoint {path}: missing file {META_FILE}")
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HDLMError(f"checkpoint file {f} is corrupt ({_one_line(e)})") from None


def _verified(path: Path, name: str, meta: dict) -> Path:
    f = path / name
    if not f.exists():
        raise HDLMError(f"checkpoint {path}: missing file {name}")
    expected = meta.get("sha256", {}).get(name)
    if expected is not None and sha256_file(f) != expected:
        raise HDLMError(f"checkpoint file {f} is corrupt (sha256 does not match meta.json)")
    return f


def read_config(path: str | Path) -> Config:
    """The validated config of a checkpoint folder (or run folder): config.yaml, else config.json."""
    path = resolve_checkpoint(path)
    f = path / CONFIG_FILE
    hub = read_hub_config(path) if not f.exists() else None
    if hub is not None and "hdlm_format" in hub:
        d, f = hub.get("config"), path / HUB_CONFIG_FILE
    elif not f.exists():
        raise HDLMError(f"checkpoint {path}: missing file {CONFIG_FILE}")
    else:
        try:
            d = yaml.safe_load(f.read_text())
        except yaml.YAMLError as e:
            raise HDLMError(f"checkpoint file {f} is not valid YAML ({_one_line(e)})") from None
    try:
        return Config.from_dict(d)
    except HDLMError as e:
        raise HDLMError(f"checkpoint file {f}: {e}") from None


def _read_tokenizer_json(path: Path) -> dict:
    f = path / TOKENIZER_FILE
    if not f.exists():
        raise HDLMError(f"checkpoint {path}: missing file {TOKENIZER_FILE}")
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HDLMError(f"checkpoint file {f} is corrupt ({_one_line(e)})") from None
    if not isinstance(d, dict):
        raise HDLMError(f"checkpoint file {f} is corrupt (expected a JSON object)")
    return d


def _is_identity(d: dict) -> bool:
    """An identity-only tokenizer.json (checkpoints written before the whole tokenizer was)."""
    return "vocab_hash" in d and "model" not in d


def read_tokenizer_identity(path: Path) -> dict:
    """The tokenizer identity of a checkpoint folder: the identity-only ``tokenizer.json`` of older
    checkpoints, else the one recorded in meta.json / config.json, else computed from the file."""
    d = _read_tokenizer_json(path)
    if _is_identity(d):
        return d
    from .tokenizers import from_path

    if (recorded := recorded_identity(path)) is not None:
        return recorded
    return from_path(path).identity()


def load_checkpoint(path_or_run_dir: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify a checkpoint (a checkpoint folder, or a run folder via ``latest``).

    Every binary file is checked against the sha256 in ``meta.json``; a missing folder or file, a
    corrupt file or a config that does not validate raises one :class:`HDLMError` line naming it.
    """
    path = resolve_checkpoint(path_or_run_dir)
    meta = _read_meta(path)
    cfg = read_config(path)
    tok = read_tokenizer_identity(path)
    model_state = _load_safetensors(_verified(path, MODEL_FILE, meta), map_location)
    ema_state = None
    if EMA_FILE in meta.get("sha256", {}) or (path / EMA_FILE).exists():
        ema_state = _load_safetensors(_verified(path, EMA_FILE, meta), map_location)
    train_state: dict = {}
    if STATE_FILE in meta.get("sha256", {}) or (path / STATE_FILE).exists():
        f = _verified(path, STATE_FILE, meta)
        try:
            train_state = from_weights_only(torch.load(f, map_location=map_location, weights_only=True))
        except Exception as e:
            raise HDLMError(f"checkpoint file {f} is corrupt or unreadable ({_one_line(e)})") from None
    return Checkpoint(path=path, step=int(meta.get("step", train_state.get("step", 0))), config=cfg,
                      tokenizer=tok, model_state=model_state, ema_state=ema_state,
                      train_state=train_state, meta=meta)


def load_weights(model: nn.Module, state: dict[str, Tensor], source: str | Path) -> None:
    """``load_state_dict`` with strict names and shapes, as one HDLMError line on mismatch."""
    target = unwrap_model(model)
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise HDLMError(f"weights in {source} do not fit the model ({what}; "
                        f"{len(missing)} missing, {len(unexpected)} unexpected)")
    for name, t in state.items():
        if tuple(own[name].shape) != tuple(t.shape):
            raise HDLMError(f"weights in {source} do not fit the model ({name}: checkpoint "
                            f"{tuple(t.shape)} vs model {tuple(own[name].shape)})")
    target.load_state_dict(state, strict=True)


def read_weights(path: Path) -> tuple[dict[str, Tensor], Path]:
    """The weights a pretrained folder is used with: the EMA weights when it has them (the paper
    evaluates EMA models), else the model's; checked against meta.json's sha256 when there is one
    (a folder assembled on the Hub may lack meta.json). Returns (state dict, file)."""
    meta = _read_meta(path) if (path / META_FILE).exists() else {}
    name = EMA_FILE if (EMA_FILE in meta.get("sha256", {}) or (path / EMA_FILE).exists()) else MODEL_FILE
    f = _verified(path, name, meta)
    return _load_safetensors(f, "cpu"), f


# --------------------------------------------------------------------------------------------
# the Hub-native files of a folder: config.json and the whole tokenizer


def hub_config(cfg: Config, identity: dict | None) -> dict:
    """The ``config.json`` of an hdlm folder: the whole config, for the Hub and for readers without YAML."""
    return {"hdlm_format": HUB_FORMAT, "hdlm_version": __version__, "config": cfg.to_dict(), "tokenizer": identity}


def read_hub_config(path: Path) -> dict | None:
    """The parsed ``config.json`` of a folder (an hdlm or an official one), or None when it has none."""
    f = Path(path) / HUB_CONFIG_FILE
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HDLMError(f"checkpoint file {f} is not valid JSON ({_one_line(e)})") from None
    if not isinstance(d, dict):
        raise HDLMError(f"checkpoint file {f}: expected a JSON object")
    return d


def write_tokenizer(folder: Path, tokenizer: Any, cfg: Config) -> dict | None:
    """Write a folder's tokenizer files; returns the tokenizer identity.

    A :class:`~hdlm.tokenizers.Tokenizer` is written whole (:meth:`~hdlm.tokenizers.Tokenizer.save`);
    a bare identity dict (older callers) as an identity-only ``tokenizer.json``; None writes nothing.
    """
    if tokenizer is None:
        return None
    if isinstance(tokenizer, dict):
        _write_file(folder / TOKENIZER_FILE, lambda f: json.dump(tokenizer, f, indent=1, sort_keys=True),
                    binary=False)
        return tokenizer
    for path in tokenizer.save(folder, model_max_length=cfg.model.length):
        fd = os.open(path, os.O_RDONLY)  # fsynced like every other file before the folder is published
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return tokenizer.identity()


def recorded_identity(path: Path) -> dict | None:
    """The tokenizer identity that meta.json or config.json records, if any."""
    for name in (META_FILE, HUB_CONFIG_FILE):
        f = Path(path) / name
        if f.is_file():
            try:
                recorded = json.loads(f.read_text(encoding="utf-8")).get("tokenizer")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                recorded = None
            if isinstance(recorded, dict) and "vocab_hash" in recorded:
                return recorded
    return None
