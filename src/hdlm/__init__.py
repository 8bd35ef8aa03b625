"""hdlm: hybrid diffusion language models.

Implements "Unifying Autoregressive and Diffusion-Based Sequence Generation"
(Fathi, Scholak & Noël): hyperschedules, the gamma- and epsilon-hybrid noising
processes, ALIGNED/SHIFTED transformers with KV-cache-compatible attention
masks, hyperschedule-driven samplers and the paper's evaluation.

``import hdlm`` stays light (no torch): :class:`HDLMPipeline` is imported on first use.
"""

from ._version import __version__

__all__ = ["HDLMPipeline", "__version__"]


def __getattr__(name: str):
    if name == "HDLMPipeline":
        from .sampling.pipeline import HDLMPipeline

        return HDLMPipeline
    raise AttributeError(f"module 'hdlm' has no attribute {name!r}")
