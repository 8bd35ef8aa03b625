"""A pipeline object for users who only want to sample (GIDD-style; DESIGN.md §10).

    pipe = HDLMPipeline.from_pretrained("runs/owt/step-00100000")   # or "hdlm-group/hdlm-base-gamma-0.01"
    texts = pipe.generate(4, prompt="The meaning of life is", schedule="block", rho=2, seed=0)
    pipe.save_pretrained("export/owt")                              # a folder that samples anywhere

The checkpoint's config supplies the model, the process, the hyperschedule (overridable per
call: kind, width, ρ, steps) and the sampling defaults (``config.sample``); the tokenizer is the
one saved in the folder (checked against its identity).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import re

import torch

from ..errors import HDLMError
from ..runtime import resolve_device
from .generate import GenerationResult, generate
from .rng import SequenceGenerators
from .samplers import make_sampler


def _merge(results: list[GenerationResult]) -> GenerationResult:
    """One result for several batches: tokens stacked, calls and times summed, first batch's trace."""
    wall = sum(r.wall_time for r in results)
    tokens = torch.cat([r.tokens.cpu() for r in results])
    generated = tokens.shape[0] * (tokens.shape[1] - results[0].prompt_len)
    lengths = None
    if results[0].lengths is not None:
        lengths = torch.cat([r.lengths for r in results])
        generated = int((lengths - results[0].prompt_len).sum())
    return GenerationResult(tokens=tokens, n_model_calls=sum(r.n_model_calls for r in results), wall_time=wall,
                            tokens_per_s=generated / wall if wall > 0 else float("inf"), steps=results[0].steps,
                            prompt_len=results[0].prompt_len, sampler=results[0].sampler,
                            hyperschedule=results[0].hyperschedule, trace=results[0].trace, lengths=lengths,
                            n_reused=sum(r.n_reused for r in results))


INFILL_GAP = re.compile(r"\[MASK(?::(\d+))?\]")


def parse_infill(template: str, encode, length: int) -> list[int]:
    """An infilling template -> d conditions: token ids where given, −1 where generated.

    "the [MASK:12] of the city": each text piece is tokenized on its own (a piece before a gap
    loses its trailing spaces), ``[MASK:k]`` is k generated positions and ``[MASK]`` one; the
    template starts at position 0 and the positions after its end are generated too.
    """
    out: list[int] = []
    pos = 0
    for gap in INFILL_GAP.finditer(template):
        out += encode(template[pos: gap.start()].rstrip()) if template[pos: gap.start()].strip() else []
        out += [-1] * int(gap.group(1) or 1)
        pos = gap.end()
    out += encode(template[pos:]) if template[pos:].strip() else []
    if -1 not in out and len(out) >= length:
        raise HDLMError("infill template has nothing to generate: add [MASK] or [MASK:k] gaps")
    if len(out) > length:
        raise HDLMError(f"infill template fills {len(out)} positions > the sequence length d = {length}")
    return out + [-1] * (length - len(out))


class HDLMPipeline:
    """A trained model with its process, tokenizer and defaults, ready to sample."""

    def __init__(self, model, config, tokenizer, device: Any = None) -> None:
        from ..processes import make_process

        self.device = resolve_device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.config = config
        self.tokenizer = tokenizer
        self.process = make_process(config.process, model.n_real)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: Any = None, **hub: Any) -> "HDLMPipeline":
        """Load a pretrained / checkpoint / run folder (EMA weights when present), an official
        checkpoint, or a Hugging Face Hub id (``hub``: revision, local_files_only, cache_dir);
        see :func:`hdlm.hub.load_pretrained`. The tokenizer comes from the folder itself."""
        from ..hub import load_pretrained

        dev = resolve_device(device)
        pre = load_pretrained(path, device=dev, **hub)
        return cls(pre.model, pre.config, pre.tokenizer, dev)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write the Hub-native folder (config.json, model.safetensors, the whole tokenizer) that
        :meth:`from_pretrained` reads anywhere, with no other file."""
        from ..hub import save_pretrained

        return save_pretrained(self.model, self.config, self.tokenizer, out_dir)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """:meth:`save_pretrained` into a temporary folder and upload it (``token``, ``private``, ...)."""
        from ..hub import push_pretrained

        return push_pretrained(self.model, self.config, self.tokenizer, repo_id, **kwargs)

    @property
    def length(self) -> int:
        return self.config.model.length

    def hyperschedule(self, schedule: str | None = None, *, width: int | None = None, rho: float | None = None,
                      steps: int | None = None, length: int | None = None):
        """The checkpoint's hyperschedule, or another one of length d (§3.1): ``schedule`` kind,
        ``width`` ω (block/slide), ``rho`` ρ, ``steps`` T (flat), merged with the config by the one
        rule of :func:`hdlm.hyperschedule.from_config` (shared with ``hdlm eval ppl``). ``length``:
        generate L positions instead of d (L > d: Block, Slide and Quench, a window of d)."""
        from ..hyperschedule import from_config

        if length is not None and (int(length) != length or length < 1):
            raise HDLMError(f"length = {length!r}: must be a positive integer")
        return from_config(self.config.schedule, length or self.length, kind=schedule, width=width, rho=rho,
                           steps=steps)

    def encode_prompt(self, prompt: str | list[int] | None, length: int | None = None,
                      bos_eos: bool = False) -> torch.Tensor | None:
        """The prompt's ids (``bos_eos``: after an EOS, so that a sample starts a document)."""
        length = length or self.length
        if prompt is None or (isinstance(prompt, str) and not prompt):
            ids = []
        else:
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        ids = [self.tokenizer.eos_id] * bool(bos_eos) + ids
        if len(ids) >= length:
            raise HDLMError(f"prompt has {len(ids)} tokens; it must be shorter than the sequence length "
                            f"d = {length}")
        return torch.tensor(ids, dtype=torch.long) if ids else None

    def generate_ids(self, num_samples: int | None = None, prompt: str | list[int] | None = None, *,
                     schedule: str | None = None, width: int | None = None, rho: float | None = None,
                     steps: int | None = None, sampler: str | None = None, eta: float | None = None,
                     temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                     seed: int | None = None, kv_cache: bool | None = None, batch_size: int | None = None,
                     draw: str | None = None, float64: bool | None = None, trace: bool = False,
                     progress: bool = False, length: int | None = None, stop_at_eos: bool = False,
                     bos_eos: bool = False, infill: str | list[int] | None = None,
                     on_batch: Callable[[int], None] | None = None) -> GenerationResult:
        """Generate token ids (num_samples, d), prompt included; unset options come from ``config.sample``.

        ``draw``: "cdf" (exact float64 inverse CDF), "gumbel" (float64 Gumbel-max) or "float32-gumbel"
        (the reference code's draws, App. F.2; ``float64=False`` is an older spelling of it).
        ``length``: L positions (default d); ``stop_at_eos``: stop once each sample has settled an EOS
        (``result.lengths``); ``bos_eos``: start after an EOS; ``infill``: a template such as
        "the [MASK:12] of the city" or d ids with −1 to generate (Flat only, see :func:`parse_infill`).
        ``on_batch``: called with the number of sequences after each batch (the commands' progress).
        """
        sc = self.config.sample
        opts = replace(sc, **{k: v for k, v in dict(
            sampler=sampler, eta=eta, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            kv_cache=kv_cache, num_samples=num_samples, batch_size=batch_size,
            draw="float32-gumbel" if float64 is False else draw).items()
            if v is not None})
        for name, value in (("num_samples", opts.num_samples), ("batch_size", opts.batch_size)):
            if int(value) != value or value < 1:
                raise HDLMError(f"{name} = {value!r}: must be a positive integer")
        hs = self.hyperschedule(schedule, width=width, rho=rho, steps=steps, length=length)
        smp = make_sampler(opts.sampler, self.process, hyperschedule=hs, eta=opts.eta,
                           temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                           method=opts.draw)
        ids = self.encode_prompt(prompt, hs.d, bos_eos)
        if isinstance(infill, str):
            infill = parse_infill(infill, self.tokenizer.encode, hs.d)
        eos = self.tokenizer.eos_id if stop_at_eos else None
        results, done, total = [], 0, int(opts.num_samples)
        while done < total:
            b = min(int(opts.batch_size), total - done)
            # sample i draws from its own stream (seed, i): the texts do not depend on the batch size
            gen = SequenceGenerators(int(opts.seed), range(done, done + b), self.device)
            results.append(generate(self.model, self.process, hs, smp, b, prompt=ids, generator=gen,
                                    kv_cache=opts.kv_cache, trace=trace and not results, progress=progress,
                                    stop_at_eos=eos, infill=infill))
            done += b
            if on_batch is not None:
                on_batch(b)
        return _merge(results)

    def decode(self, tokens: torch.Tensor | GenerationResult) -> list[str]:
        """Texts of token rows, or of a result (each cut before its EOS with ``stop_at_eos``)."""
        rows = tokens.texts_ids() if isinstance(tokens, GenerationResult) else tokens.tolist()
        return [self.tokenizer.decode(row) for row in rows]

    def generate(self, num_samples: int | None = None, prompt: str | list[int] | None = None, **kwargs) -> list[str]:
        """Generate texts (prompt included); keyword options as in :meth:`generate_ids`."""
        return self.decode(self.generate_ids(num_samples, prompt, **kwargs))
