"""lm-evaluation-harness adapter: an ``lm_eval`` LM registered under the name ``hdlm``.

    import hdlm.harness, lm_eval
    results = lm_eval.simple_evaluate(model="hdlm", model_args="checkpoint=runs/ptb,mc_samples=16",
                                      tasks=["lambada_openai"])

or ``hdlm eval harness --checkpoint runs/ptb --tasks lambada_openai``. ``checkpoint`` is anything
:meth:`hdlm.sampling.HDLMPipeline.from_pretrained` loads. Other model arguments: ``schedule``,
``width``, ``rho``, ``steps`` (the hyperschedule, merged with the checkpoint's by
:func:`hdlm.hyperschedule.from_config`), ``mc_samples`` (trajectories per request, default 8),
``variational`` (the bound's noising chain), ``kernel`` (the reverse kernel the bound scores),
``sampler`` (for generation), ``seed``, ``greedy_check`` (default true), ``device``.

- ``loglikelihood(context, continuation)``: the context is a settled prompt and the continuation is
  scored by :func:`hdlm.evaluation.conditional.continuation_logprob`: EXACT for Quench + SHIFTED
  (an AR model), otherwise minus a Monte-Carlo estimate of the discrete UPPER BOUND on the NLL of
  the sampler's generative process (so a lower bound on the log-likelihood, in expectation).
  ``is_greedy``: the argmax test for AR; otherwise whether the samplers with top-k = 1 (the most
  likely token whenever one is revealed), from the context, produce the continuation
  (``greedy_check=false`` skips that decode and answers False).
- ``loglikelihood_rolling(text)``: the sum of ``loglikelihood`` over lm-eval's rolling windows of
  at most d tokens (EOS as the prefix token), each token scored once.
- ``generate_until(context, gen_kwargs)``: the samplers (KV cache) from the context as a prompt,
  ``max_gen_toks`` new tokens at most (the context is cut from the left to leave room, as HF models
  do), then cut at the first EOS and the first ``until`` string; ``temperature = 0`` or
  ``do_sample = False`` is greedy (top-k = 1).

Texts are tokenised as the HF models of lm-eval do: a context's trailing spaces move to the
continuation, and the continuation's tokens are those of context ⁀ continuation after the context's.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import HDLMError

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # an optional extra: one clear line
    raise HDLMError("hdlm.harness needs lm-evaluation-harness: pip install 'hdlm[harness]' (lm-eval)") from None

log = logging.getLogger(__name__)
DEFAULT_MAX_GEN_TOKS = 256


def _int_or_none(name: str, value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise HDLMError(f"hdlm harness: {name} = {value!r} must be an integer") from None
    if out != float(value) or out < 1:
        raise HDLMError(f"hdlm harness: {name} = {value!r} must be a positive integer")
    return out


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise HDLMError(f"hdlm harness: {name} = {value!r} must be true or false")


@register_model("hdlm")
class HDLMHarnessLM(LM):
    """An hdlm checkpoint as an lm-eval model (see the module docstring for what each request returns)."""

    def __init__(self, checkpoint: str | None = None, *, schedule: str | None = None, width: Any = None,
                 rho: Any = None, steps: Any = None, mc_samples: Any = 8, variational: str = "auto",
                 kernel: str | None = None, sampler: str | None = None, seed: Any = 0, greedy_check: Any = True,
                 device: str | None = None, batch_size: Any = None, max_batch_size: Any = None, **unused: Any):
        super().__init__()
        if not checkpoint:
            raise HDLMError("hdlm harness: model_args needs checkpoint=DIR (a checkpoint, run or pretrained folder)")
        if unused:
            raise HDLMError(f"hdlm harness: unknown model argument(s) {', '.join(sorted(unused))}")
        from .evaluation.discrete import ReverseChain, resolved_variational, variational_chain
        from .sampling import HDLMPipeline

        self.mc_samples = _int_or_none("mc_samples", mc_samples) or 8
        self.seed, self.greedy_check, self.sampler = int(seed), _bool("greedy_check", greedy_check), sampler
        self.pipe = HDLMPipeline.from_pretrained(checkpoint, device=device or "auto")
        self.schedule_args = dict(schedule=schedule, width=_int_or_none("width", width),
                                  rho=float(rho) if rho not in (None, "") else None,
                                  steps=_int_or_none("steps", steps))
        self.hs = self.pipe.hyperschedule(**self.schedule_args)
        self.chain = ReverseChain.from_config(self.pipe.model, self.pipe.config, schedule=self.hs, kernel=kernel)
        self.q_chain = variational_chain(self.chain.process, variational)
        self.variational = resolved_variational(self.chain.process, variational)
        self._device = self.pipe.device
        self.checkpoint = str(checkpoint)
        log.warning("hdlm harness: %s", self.likelihood_kind)

    # -----------------------------------------------------------------------------------------
    # what the numbers are

    @property
    def d(self) -> int:
        return self.hs.d

    @property
    def likelihood_kind(self) -> str:
        """One line saying what ``loglikelihood`` returns (printed, and recorded by ``hdlm eval harness``)."""
        hs = self.hs
        if self.chain.ar:
            return "loglikelihood is EXACT (Quench + SHIFTED: an autoregressive model)"
        return (f"loglikelihood is minus a Monte-Carlo estimate of an UPPER BOUND on the NLL (discrete bound of "
                f"the '{self.chain.kernel}' kernel under {hs.kind} T={hs.T}, ω={hs.width}; variational chain "
                f"{self.variational}; {self.mc_samples} trajectories per request): a lower bound on log p in "
                f"expectation; is_greedy: {'top-k = 1 decode' if self.greedy_check else 'not checked (False)'}")

    def provenance(self) -> dict:
        hs = self.hs
        return {"checkpoint": self.checkpoint, "likelihood": "exact" if self.chain.ar else "bound",
                "likelihood_kind": self.likelihood_kind, "kernel": None if self.chain.ar else self.chain.kernel,
                "variational": None if self.chain.ar else self.variational, "mc_samples": self.mc_samples,
                "schedule": {"kind": hs.kind, "d": hs.d, "T": hs.T, "levels": hs.levels, "width": hs.width},
                "seed": self.seed, "greedy_check": self.greedy_check}

    # -----------------------------------------------------------------------------------------
    # tokens

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval's HF models split them, context cut from the left to fit d."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        tok = self.pipe.tokenizer
        whole = tok.encode(context + continuation)
        ctx = tok.encode(context) if context else []
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else tok.encode(continuation)
        if len(cont) > self.d:
            raise HDLMError(f"loglikelihood: a continuation of {len(cont)} tokens is longer than d = {self.d}")
        return ctx[max(0, len(ctx) + len(cont) - self.d):], cont

    def score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        from .evaluation.conditional import continuation_logprob

        s = continuation_logprob(self.chain, self.q_chain, ctx, cont, M=self.mc_samples, seed=self.seed)
        greedy = s.greedy if s.exact else (self.greedy_check and self._greedy_decode(ctx, len(cont)) == cont)
        return float(s.logprob), bool(greedy)

    def _generate(self, ctx: list[int], n_new: int, greedy: bool, temperature: float | None = None) -> list[int]:
        """The first ``n_new`` generated tokens after the prompt ``ctx`` (the samplers, one sample)."""
        from .evaluation.conditional import request_seed

        result = self.pipe.generate_ids(1, ctx or None, sampler=self.sampler, seed=request_seed(self.seed, ctx, [n_new])
                                        % (1 << 63), top_k=1 if greedy else None, temperature=temperature,
                                        **self.schedule_args)
        return result.tokens[0, len(ctx):len(ctx) + n_new].tolist()

    def _greedy_decode(self, ctx: list[int], n: int) -> list[int]:
        return self._generate(ctx, n, greedy=True)

    # -----------------------------------------------------------------------------------------
    # the three requests of lm-eval

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in tqdm(requests, desc="hdlm loglikelihood", disable=disable_tqdm):
            context, continuation = req.args[:2]
            out.append(self.score(*self.encode_pair(context, continuation)))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), out[-1])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        eos = self.pipe.tokenizer.eos_id
        for req in tqdm(requests, desc="hdlm loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args[:1]
            ids = self.pipe.tokenizer.encode(text)
            windows = map(make_disjoint_window, get_rolling_token_windows(ids, eos, self.d - 1, 1))
            total = sum(self.score(list(ctx), list(cont))[0] for ctx, cont in windows)
            out.append(float(total))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), out[-1])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        tok = self.pipe.tokenizer
        for req in tqdm(requests, desc="hdlm generate_until", disable=disable_tqdm):
            context, kwargs = req.args[0], dict(req.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            n_new = min(int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), self.d - 1)
            temperature = float(kwargs.pop("temperature", 1.0))
            greedy = temperature == 0.0 or not _bool("do_sample", kwargs.pop("do_sample", True))
            ctx = tok.encode(context) if context else []
            ctx = ctx[max(0, len(ctx) - (self.d - n_new)):]
            ids = self._generate(ctx, n_new, greedy, None if greedy else temperature)
            if tok.eos_id in ids:
                ids = ids[:ids.index(tok.eos_id)]
            text = tok.decode(ids)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return out


def evaluate(lm: HDLMHarnessLM, tasks: list[str], *, include_path: str | None = None, num_fewshot: int | None = None,
             limit: float | None = None, seed: int = 0, log_samples: bool = False) -> dict:
    """Run lm-eval on ``tasks`` with ``lm``; the results dict gets an ``"hdlm"`` entry saying what
    the log-likelihoods are (exact or a bound) and how they were computed."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path:  # local tasks only: skip indexing lm-eval's ~15k task files (~13 s)
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):
            manager = TaskManager(include_path=include_path)
    manager = manager or TaskManager()
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=log_samples, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if results is None:  # not rank 0
        return {}
    results["hdlm"] = lm.provenance()
    return results


__all__ = ["HDLMHarnessLM", "evaluate"]
