"""hdlm: hybrid diffusion language models.

Implements "Unifying Autoregressive and Diffusion-Based Sequence Generation"
(Fathi, Scholak & Noël): hyperschedules, the gamma- and epsilon-hybrid noising
processes, ALIGNED/SHIFTED transformers with KV-cache-compatible attention
masks, hyperschedule-driven samplers and the paper's evaluation.
"""

__version__ = "0.1.0"
