"""The backbone factory: the network behind the cells (DESIGN.md §4; docs/conversion.md).

Both backbones have the same interface — ``forward(tokens, sigma, positions, mask, keep=None,
out_index=None, cache=None, commit=0) -> raw (B, K, N)``, ``new_cache``, ``n_real`` and ``cfg`` — so
cells, masks, the objective, the samplers, the KV cache and the bounds run on either.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    """The backbone ``cfg.backbone`` names: the DiT (:class:`hdlm.model.HDLMTransformer`) or a converted
    Hugging Face causal LM (:class:`hdlm.hf_backbone.HFBackbone`, randomly initialised here: its weights
    come from a checkpoint)."""
    if cfg.backbone == "hf":
        from .hf_backbone import HFBackbone

        return HFBackbone(cfg)
    from .model import HDLMTransformer

    return HDLMTransformer(cfg)


def model_from_files(files: Any, device: Any = "cpu") -> nn.Module:
    """The backbone of a :class:`hdlm.hub_files.PretrainedFiles` (its config and weights), in eval mode;
    the weights must fit exactly (one HDLMError line naming the first misfit otherwise)."""
    from .checkpoint import load_weights

    model = build_model(files.config.model)
    load_weights(model, files.state, files.weights)
    return model.to(device).eval()
