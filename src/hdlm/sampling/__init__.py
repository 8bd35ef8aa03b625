"""Generation (paper §3.3-3.4, App. B.4, App. D): samplers, the KV-cached driver, a pipeline.

- :mod:`.samplers`: one reverse step on the active positions (analytic, Euler, ancestral = Alg. 3,
  ACS = Alg. 4, AR) and exact float64 categorical draws.
- :mod:`.generate`: the hyperschedule-driven loop with an exact KV cache.
- :mod:`.rng`: one random stream per sequence (the same seed gives the same text whatever the batch).
- :mod:`.pipeline`: :class:`HDLMPipeline`, ``from_pretrained(dir).generate(...)``.
"""

from .generate import GenerationResult, StepInfo, TraceStep, generate
from .generate import OutputStore
from .pipeline import HDLMPipeline, resolve_device
from .rng import SequenceGenerators
from .samplers import (
    SAMPLERS,
    AncestralSampler,
    PosteriorSampler,
    ARSampler,
    Categorical,
    KernelSampler,
    Sampler,
    ScoreSampler,
    gumbel_max_draw,
    inverse_cdf_draw,
    make_sampler,
    shape_log_probs,
)

__all__ = [
    "SAMPLERS", "AncestralSampler", "ARSampler", "Categorical", "GenerationResult", "HDLMPipeline", "KernelSampler", "OutputStore", "PosteriorSampler", "Sampler",
    "SequenceGenerators",
    "ScoreSampler", "StepInfo", "TraceStep", "generate", "gumbel_max_draw", "inverse_cdf_draw", "make_sampler",
    "resolve_device", "shape_log_probs",
]
