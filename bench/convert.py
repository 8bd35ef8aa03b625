"""Converting SmolLM2-135M into a hybrid diffusion LM, as a measured experiment (issue #11; docs/conversion.md).

One run, one machine, side by side:

1. the AR model before conversion: its exact NLL on PTB test (Quench + SHIFTED through hdlm's cells,
   which is the HF model's own next-token loss), and the Block bound of the converted-but-untrained model;
2. fine-tuning (``hdlm train --init-from`` the converted folder): the validation NELBO curve;
3. after fine-tuning: the Block (or Slide) bound on PTB test, both estimators (discrete: a bound on the
   NLL of the T-step sampler; continuous: Algorithm 1 on the training objective, an estimate for ε > 0);
   samples with the KV cache (tokens/s), their generative perplexity under a judge that is not the
   converted model (Gemma-3-270M) and their token entropy; the AR model's own ``generate`` (tokens/s,
   judge perplexity) and hdlm's AR sampler on the unconverted model as references;
4. the default preset's from-scratch DiT (tiny-ptb, BERT tokens) trained for the same wall time, with
   the same evaluations. Tokenizers differ, so NLLs are also given per PTB word (estimate: nats/token ×
   tokens/word of the whole PTB test split, each line counting its end as one word).

Everything expensive is cached in ``--out`` (the converted folder, each run folder, ``results.json`` per
stage) and the GGUF conversions in ``--cache-dir``: an interrupted run resumes where it stopped.

    python bench/convert.py --quick                  # smoke run (~minutes): tiny lengths and counts
    python bench/convert.py                          # the full experiment (~30 min on 2 quiet cores)
    python bench/convert.py --schedule slide         # the Slide preset instead of Block
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from hdlm.checkpoint import list_checkpoints
from hdlm.hub import from_pretrained
from hdlm.config import load_config
from hdlm.conversion import convert_to_folder, document_start_token, gemma3_gguf_path, load_causal_lm
from hdlm.data import iter_documents, load_split
from hdlm.evaluation.judge import load_judge
from hdlm.evaluation.likelihood import perplexity_bound
from hdlm.evaluation.quality import generative_perplexity, token_entropy
from hdlm.hyperschedule import quench
from hdlm.plots.curves import read_metrics
from hdlm.sampling import HDLMPipeline
from hdlm.tokenizers import load_tokenizer
from hdlm.train import train

FULL = dict(length=128, batch=4, steps=60, eval_every=10, eval_batches=2, eval_seqs=32, mc=4, samples=8)
QUICK = dict(length=32, batch=2, steps=3, eval_every=1, eval_batches=1, eval_seqs=2, mc=2, samples=2)
MARK_BEGIN, MARK_END = "<!-- bench/convert.py:begin -->", "<!-- bench/convert.py:end -->"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny lengths, steps and counts")
    ap.add_argument("--schedule", choices=("block", "slide"), default="block")
    ap.add_argument("--out", default=None, help="work folder (default: runs/bench-convert[-quick])")
    ap.add_argument("--cache-dir", default=".hdlm_cache")
    ap.add_argument("--results", default="bench/RESULTS.md", help="markdown file to update ('' = none)")
    for key, value in FULL.items():
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"(full: {value}, quick: "
                        f"{QUICK[key]})")
    args = ap.parse_args()
    for key in FULL:
        if getattr(args, key) is None:
            setattr(args, key, (QUICK if args.quick else FULL)[key])
    args.out = Path(args.out or f"runs/bench-convert{'-quick' if args.quick else ''}-{args.schedule}")
    return args


class Stages:
    """results.json in the work folder: a stage that already ran is read back, not rerun."""

    def __init__(self, out: Path) -> None:
        self.path = out / "results.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, fn):
        if name not in self.data:
            start = time.perf_counter()
            print(f"bench/convert: {name} ...", flush=True)
            value = fn()
            print(f"bench/convert: {name} done in {time.perf_counter() - start:.0f} s", flush=True)
            self.data[name] = value
            self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        return self.data[name]


# --------------------------------------------------------------------------------------------
# pieces


def tokens_per_word(tokenizer) -> float:
    """Tokens per PTB test word, each line's end counting as one word and one token (its EOS)."""
    words = tokens = 0
    for line in iter_documents("ptb", "test"):
        words += len(line.split()) + 1
        tokens += len(tokenizer.encode(line)) + 1
    return tokens / words


def test_blocks(cfg, tokenizer, n: int) -> torch.Tensor:
    data = load_split(cfg.data, "test", tokenizer, cfg.model.length)
    return data.gather(list(range(min(n, len(data)))))


def bound(model, cfg, data, estimator: str, mc: int, schedule=None) -> dict:
    res = perplexity_bound(model, cfg, data, estimator=estimator, mc_samples=mc, schedule=schedule, batch_size=4,
                           progress=False)
    return {"estimator": res.estimator, "nll": res.nll_per_token, "stderr": res.stderr, "ppl": res.ppl,
            "tokens": res.n_tokens, "schedule": f"{res.schedule['kind']} T={res.schedule['T']}"}


def samples(model, cfg, tokenizer, judge, n: int, batch: int, schedule: str | None = None) -> dict:
    pipe = HDLMPipeline(model, cfg, tokenizer)
    res = pipe.generate_ids(n, batch_size=batch, schedule=schedule, seed=0, kv_cache=True)
    texts = pipe.decode(res.tokens)
    gp = generative_perplexity(texts, judge, progress=False)
    return {"sampler": res.sampler, "steps": res.steps, "tokens_per_s": res.tokens_per_s,
            "gen_ppl": gp["ppl_token_weighted"], "entropy": token_entropy(res.tokens.tolist())["mean"],
            "example": texts[0][:300]}


def hf_generate(folder: Path, judge, n: int, batch: int, d: int, start_id: int) -> dict:
    """The AR model's own ``generate`` (HF KV cache, multinomial sampling at temperature 1)."""
    import transformers

    lm = load_causal_lm(folder).eval()
    lm.config._attn_implementation = "sdpa"
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    torch.manual_seed(0)
    rows, wall = [], 0.0
    for b in range(0, n, batch):
        start = torch.full((min(batch, n - b), 1), start_id)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = lm.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0, top_p=1.0,
                              temperature=1.0, max_new_tokens=d, min_new_tokens=d, pad_token_id=start_id)
        wall += time.perf_counter() - t0
        rows += out[:, 1:].tolist()
    texts = tok.batch_decode(rows, skip_special_tokens=False)
    gp = generative_perplexity(texts, judge, progress=False)
    return {"tokens_per_s": n * d / wall, "gen_ppl": gp["ppl_token_weighted"], "entropy": token_entropy(rows)["mean"],
            "example": texts[0][:300]}


def finetune(cfg, run_dir: Path) -> list[dict]:
    """Train (or resume, or read back) a run; returns its metrics rows."""
    done = (run_dir / "metrics.jsonl").is_file() and any(
        r.get("step") == cfg.train.steps and r.get("split") == "valid" for r in read_metrics(run_dir / "metrics.jsonl"))
    if not done:
        train(cfg, resume=str(run_dir) if list_checkpoints(run_dir) else None)
    return read_metrics(run_dir / "metrics.jsonl")


def dit_steps_for(seconds: float, cfg, probe_dir: Path) -> int:
    """Optimizer steps of the DiT preset that fit in ``seconds`` (from a short timed probe run)."""
    probe = cfg.replace({"train.steps": 3, "train.out_dir": str(probe_dir), "train.eval_every": 1000,
                         "train.save_every": 1000, "train.log_every": 1})
    rows = finetune(probe, probe_dir)
    train_rows = [r for r in rows if r["split"] == "train"]
    per_step = (train_rows[-1]["elapsed"] - train_rows[0]["elapsed"]) / max(1, len(train_rows) - 1)
    return max(1, int(seconds / per_step))


# --------------------------------------------------------------------------------------------
# the experiment


def converted_arm(args, st: Stages, judge) -> dict:
    preset = f"smollm2-ptb-{args.schedule}"
    over = {"model.length": args.length, "train.batch_size": args.batch, "train.steps": args.steps,
            "train.eval_every": args.eval_every, "train.eval_batches": args.eval_batches,
            "train.save_every": max(args.eval_every, args.steps // 3),  # 135M + AdamW: ~2 GB per save
            "train.log_every": 1, "train.warmup": min(5, args.steps),
            "data.cache_dir": args.cache_dir, "sample.num_samples": args.samples, "sample.batch_size": args.samples}
    folder = args.out / "converted"
    if not (folder / "meta.json").is_file():
        convert_to_folder(None, load_config(preset, over), folder, cache_dir=args.cache_dir)
    model, cfg, _ = from_pretrained(folder)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    data = test_blocks(cfg, tokenizer, args.eval_seqs)
    r = {"tokens_per_word": st.run("smollm2 tokens/word", lambda: tokens_per_word(tokenizer))}
    r["before_exact"] = st.run("AR model: exact NLL (Quench)", lambda: bound(model, cfg, data, "discrete", 1,
                                                                              quench(cfg.model.length)))
    r["before_bound"] = st.run("converted, untrained: discrete bound", lambda: bound(model, cfg, data, "discrete",
                                                                                     args.mc))
    hf_folder = Path(cfg.data.tokenizer)  # the converted model's HF folder holds its tokenizer
    r["hf_generate"] = st.run("AR model: HF generate", lambda: hf_generate(
        hf_folder, judge, args.samples, args.samples, cfg.model.length, document_start_token(hf_folder)))
    r["ar_sampler"] = st.run("AR model: hdlm AR sampler (Quench, KV cache)", lambda: samples(
        model, cfg, tokenizer, judge, args.samples, args.samples, schedule="quench"))
    run_dir = args.out / "finetune"
    ft_cfg = cfg.replace({"train.init_from": str(folder), "train.out_dir": str(run_dir)})
    rows = finetune(ft_cfg, run_dir)
    r["curve"] = [(x["elapsed"], x["nelbo"]) for x in rows if x["split"] == "valid"]
    r["train_seconds"] = max(x["elapsed"] for x in rows)
    model, cfg, _ = from_pretrained(run_dir)
    r["after_discrete"] = st.run("fine-tuned: discrete bound", lambda: bound(model, cfg, data, "discrete", args.mc))
    r["after_continuous"] = st.run("fine-tuned: continuous", lambda: bound(model, cfg, data, "continuous", args.mc))
    r["samples"] = st.run("fine-tuned: samples", lambda: samples(model, cfg, tokenizer, judge, args.samples,
                                                                 args.samples))
    r["config"] = f"{preset}: {cfg.process.kind} eps={cfg.process.epsilon}, {cfg.schedule.kind} w={cfg.schedule.width}"
    return r


def dit_arm(args, st: Stages, judge, seconds: float) -> dict:
    over = {"data.cache_dir": args.cache_dir, "model.length": args.length, "train.log_every": 1,
            "sample.num_samples": args.samples, "sample.batch_size": args.samples}
    cfg = load_config("tiny-ptb", over)
    steps = st.run("DiT: steps for equal wall time", lambda: dit_steps_for(seconds, cfg, args.out / "dit-probe"))
    run_dir = args.out / "dit"
    cfg = cfg.replace({"train.steps": steps, "train.out_dir": str(run_dir), "train.warmup": min(40, steps),
                       "train.eval_every": max(1, steps // 6), "train.save_every": max(1, steps // 6)})
    rows = finetune(cfg, run_dir)
    model, cfg, _ = from_pretrained(run_dir)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    data = test_blocks(cfg, tokenizer, args.eval_seqs)
    r = {"tokens_per_word": st.run("bert tokens/word", lambda: tokens_per_word(tokenizer)), "steps": steps,
         "curve": [(x["elapsed"], x["nelbo"]) for x in rows if x["split"] == "valid"],
         "train_seconds": max(x["elapsed"] for x in rows)}
    r["after_discrete"] = st.run("DiT: discrete bound", lambda: bound(model, cfg, data, "discrete", args.mc))
    r["after_continuous"] = st.run("DiT: continuous", lambda: bound(model, cfg, data, "continuous", args.mc))
    r["samples"] = st.run("DiT: samples", lambda: samples(model, cfg, tokenizer, judge, args.samples, args.samples))
    r["config"] = f"tiny-ptb: {cfg.process.kind} gamma={cfg.process.gamma}, {cfg.schedule.kind} w={cfg.schedule.width}"
    return r


# --------------------------------------------------------------------------------------------
# report


def per_word(nll_token: float, tpw: float) -> str:
    return f"{nll_token * tpw:.3f} ({math.exp(min(nll_token * tpw, 700)):.1f})"


def plot(hf: dict, dit: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, label, style in ((hf, "SmolLM2-135M converted (fine-tuning)", "o-"), (dit, "DiT from scratch (tiny-ptb)", "s-")):
        pts = [(t / 60, v * arm["tokens_per_word"]) for t, v in arm["curve"]]
        if pts:
            ax.plot(*zip(*pts), style, ms=4, label=label)
    b = hf["before_bound"]["nll"] * hf["tokens_per_word"]
    ax.axhline(b, color="tab:blue", ls=":", lw=1, label="converted, untrained (discrete bound, test)")
    ax.axhline(hf["before_exact"]["nll"] * hf["tokens_per_word"], color="tab:gray", ls="--", lw=1,
               label="AR model, exact NLL (Quench, test)")
    ax.set_xlabel("training wall time (min)")
    ax.set_ylabel("validation NELBO (nats per PTB word, est.)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(args, hf: dict, dit: dict, judge_name: str, picture: Path, command: str) -> str:
    kind = "SMOKE RUN (--quick: tiny lengths and counts; the numbers only show the pipeline runs)" if args.quick \
        else "full run"
    tw_h, tw_d = hf["tokens_per_word"], dit["tokens_per_word"]
    lines = [MARK_BEGIN, f"## Converting SmolLM2-135M into a hybrid ({args.schedule}) — {kind}", "",
             f"`{command}` — {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"d = {args.length}, PTB test: first {args.eval_seqs} blocks, M = {args.mc} draws; "
             f"{args.samples} samples of d tokens; judge {judge_name} (not the converted model).", "",
             f"Converted: {hf['config']}. Baseline: {dit['config']}, {dit['steps']} steps "
             f"(equal wall time: {hf['train_seconds'] / 60:.1f} vs {dit['train_seconds'] / 60:.1f} min of training).", "",
             "| model | quantity | nats/token | stderr | PPL | nats/word (PPL/word, est.) |",
             "|---|---|---:|---:|---:|---:|"]

    def row(name, what, res, tw):
        lines.append(f"| {name} | {what} ({res['schedule']}) | {res['nll']:.3f} | {res['stderr']:.3f} | "
                     f"{res['ppl']:.1f} | {per_word(res['nll'], tw)} |")

    row("SmolLM2 (AR, before)", "exact NLL", hf["before_exact"], tw_h)
    row("converted, untrained", "discrete bound", hf["before_bound"], tw_h)
    row("converted, fine-tuned", "discrete bound", hf["after_discrete"], tw_h)
    row("converted, fine-tuned", "continuous estimate", hf["after_continuous"], tw_h)
    row("DiT from scratch", "discrete bound", dit["after_discrete"], tw_d)
    row("DiT from scratch", "continuous estimate", dit["after_continuous"], tw_d)
    lines += ["", "| samples of | sampler | tokens/s | gen. PPL (judge, token-weighted) | entropy (nats) |",
              "|---|---|---:|---:|---:|"]
    for name, res in (("SmolLM2, HF `generate` (its KV cache)", hf["hf_generate"]),
                      ("SmolLM2, hdlm AR sampler (Quench, KV cache)", hf["ar_sampler"]),
                      ("converted, fine-tuned (KV cache)", hf["samples"]),
                      ("DiT from scratch (KV cache)", dit["samples"])):
        steps = f", T = {res['steps']}" if "steps" in res else ""
        lines.append(f"| {name} | {res.get('sampler', 'multinomial')}{steps} | "
                     f"{res['tokens_per_s']:.1f} | {res['gen_ppl']:.1f} | {res['entropy']:.2f} |")
    if args.quick:
        lines += ["", f"The full experiment: `python bench/convert.py --schedule {args.schedule}` (~30 min on 2 quiet "
                      f"cores; stages cached in runs/bench-convert-{args.schedule}/, an interrupted run resumes)."]
    lines += ["", f"![validation curves]({picture.name})", "",
              f"Tokens per PTB word: SmolLM2 {tw_h:.3f}, BERT {tw_d:.3f}. Example (converted): "
              f"`{hf['samples']['example'][:160]!r}`", MARK_END]
    return "\n".join(lines) + "\n"


def update_results(path: Path, section: str) -> None:
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + section + rest.split(MARK_END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> int:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join(sys.argv)
    st = Stages(args.out)
    judge = load_judge(str(gemma3_gguf_path(args.cache_dir)), cache_dir=args.cache_dir)
    hf = converted_arm(args, st, judge)
    dit = dit_arm(args, st, judge, hf["train_seconds"])
    picture = Path(args.results).parent / f"convert_{args.schedule}{'_quick' if args.quick else ''}.png" \
        if args.results else args.out / "curves.png"
    plot(hf, dit, picture)
    section = markdown(args, hf, dit, judge.name, picture, command)
    print(section)
    if args.results:
        update_results(Path(args.results), section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
