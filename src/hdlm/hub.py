"""Hub-native checkpoints: one loader for every folder hdlm understands, local or on the Hugging Face Hub.

    pre = load_pretrained("hdlm-group/hdlm-base-gamma-0.01")   # an official checkpoint (hdlm.official)
    pre = load_pretrained("runs/ptb")                           # a run folder (its latest checkpoint)
    save_pretrained(pre.model, pre.config, pre.tokenizer, "export/ptb")
    push_to_hub("export/ptb", "me/hdlm-ptb")

:func:`load_pretrained` is :func:`hdlm.hub_files.read_pretrained` (the source, its config and
weights) plus the model built from them (:func:`hdlm.backbone.model_from_files`) and the
tokenizer the checkpoint is used with. Where sources, folder kinds and the Hub-native files are
described: :mod:`hdlm.hub_files` (below the model, so that the model's own ``from_pretrained`` /
``save_pretrained`` use it); this module, above the model, is what commands and the pipeline call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import META_FILE, Checkpoint, load_checkpoint, read_tokenizer_identity, resolve_checkpoint
from .config import Config
from .hub_files import (PretrainedFiles, is_repo_id, pretrained_tokenizer, push_pretrained, push_to_hub,
                        read_pretrained, read_pretrained_config, save_pretrained, weights_sha256)
from .backbone import model_from_files
from .official import read_official


@dataclass
class Pretrained:
    """A loaded checkpoint: the model (eval mode), its config, its tokenizer (None when not asked
    for), the folder it came from, the weights file read and its format ("hdlm" or "official")."""

    model: nn.Module
    config: Config
    tokenizer: Any
    path: Path
    weights: Path
    format: str


def load_pretrained(source: str | Path, device: Any = "cpu", *, tokenizer: bool = True, revision: str | None = None,
                    local_files_only: bool | None = None, cache_dir: str | Path | None = None) -> Pretrained:
    """Load an hdlm or official checkpoint from a folder or a Hub id (docs/checkpoints.md).

    The official format is recognised by its ``config.json`` and converted exactly
    (:mod:`hdlm.official`); anything it cannot represent is one :class:`~hdlm.errors.HDLMError`
    line. ``tokenizer=False`` skips the tokenizer (the model alone).
    """
    files = read_pretrained(source, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir)
    model = model_from_files(files, device)
    tok = pretrained_tokenizer(files) if tokenizer else None
    return Pretrained(model, files.config, tok, files.path, files.weights, files.format)


def from_pretrained(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Config, dict]:
    """Build the model of an hdlm pretrained folder, checkpoint folder or run folder and load its
    weights (the EMA weights when it has them: the paper evaluates EMA models).

    Returns ``(model in eval mode on device, config, tokenizer identity)``. Hub ids and the
    official checkpoints: :func:`load_pretrained`.
    """
    path = resolve_checkpoint(Path(path))
    files = read_pretrained(path)
    return model_from_files(files, device), files.config, read_tokenizer_identity(path)


def load_official(folder: str | Path, device: Any = "cpu") -> tuple[nn.Module, Config, Path]:
    """(model in eval mode on ``device``, Config, weights file) of an official checkpoint folder."""
    cfg, state, weights = read_official(Path(folder))
    model = model_from_files(PretrainedFiles(cfg, state, Path(folder), weights, "official"), device)
    return model, cfg, weights


def init_checkpoint(source: str | Path) -> Checkpoint:
    """Stage 2's starting point (``train.init_from``): an hdlm training checkpoint (with its EMA
    weights), or any checkpoint :func:`load_pretrained` reads, official ones included."""
    if not is_repo_id(source):
        path = resolve_checkpoint(Path(source).expanduser())
        if (path / META_FILE).exists() and (path / "config.yaml").exists():
            return load_checkpoint(path)
    pre = load_pretrained(source)
    return Checkpoint(path=pre.path, step=0, config=pre.config, tokenizer=pre.tokenizer.identity(),
                      model_state={k: v.detach() for k, v in pre.model.state_dict().items()})


__all__ = ["Pretrained", "from_pretrained", "init_checkpoint", "load_official", "load_pretrained", "push_pretrained",
           "push_to_hub", "read_pretrained", "read_pretrained_config", "save_pretrained", "weights_sha256"]
