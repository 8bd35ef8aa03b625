"""Evaluation (paper App. C, F): perplexity bounds, generative perplexity, token entropy, MAUVE."""
