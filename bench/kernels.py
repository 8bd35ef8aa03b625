"""The γ-hybrid reverse kernels side by side: analytic (Tweedie, the paper's) vs posterior (issue #14 §2).

For one checkpoint, at equal steps (the checkpoint's hyperschedule) and the same seed, each kernel
generates samples (``hdlm sample --sampler K``), a judge LM scores them (``hdlm eval gen``: gen. PPL
token-weighted and per sample, entropy), and the discrete bound of that kernel is evaluated on the
first ``--sequences`` test sequences (``perplexity_bound(..., kernel=K)``; infinite draws counted).

    python bench/kernels.py --checkpoint runs/tiny-ptb --out bench/out/kernels

Writes OUT/results.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def sh(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "hdlm", *args], check=True)


def gen(ck: str, kernel: str, out: Path, n: int, judge: str) -> dict:
    raw = out / f"{kernel}.samples.json"
    sh("sample", "--checkpoint", ck, "--num-samples", str(n), "--batch-size", "16", "--sampler", kernel, "--seed", "0",
       "--out", str(raw), "--json", "--no-progress")
    rec = json.loads(raw.read_text())
    lines = out / f"{kernel}.jsonl"
    lines.write_text("".join(json.dumps({"text": s["text"]}) + "\n" for s in rec["samples"]))
    sh("eval", "gen", "--samples", str(lines), "--judge", judge, "--no-mauve", "--json", str(out / f"{kernel}.gen.json"))
    g = json.loads((out / f"{kernel}.gen.json").read_text())
    return {"steps": rec["steps"], "tokens_per_s": rec["tokens_per_s"], **g["generative_perplexity"],
            "entropy": g["entropy"]["mean"]}


def bound(ck: str, kernel: str, sequences: int, mc: int) -> dict:
    from hdlm.data import load_split
    from hdlm.evaluation.likelihood import perplexity_bound, resolve_data_spec
    from hdlm.hub import load_pretrained

    pre = load_pretrained(ck)
    data_cfg, split, label = resolve_data_spec("ptb:test", pre.config.data)
    ds = load_split(data_cfg, split, pre.tokenizer, pre.config.model.length)
    r = perplexity_bound(pre.model, pre.config, ds.gather(range(min(sequences, len(ds)))), mc_samples=mc,
                         kernel=kernel, batch_size=16, progress=False)
    return {"data": label, "nll_per_token": r.nll_per_token, "ppl": r.ppl, "stderr": r.stderr,
            "n_infinite": r.n_infinite, "draws": r.n_sequences * r.mc_samples, "variational": r.variational}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="bench/out/kernels")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--sequences", type=int, default=64, help="test sequences for the bound")
    p.add_argument("--mc-samples", type=int, default=4)
    p.add_argument("--judge", default="smollm2")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {k: {"gen": gen(a.checkpoint, k, out, a.num_samples, a.judge),
               "bound": bound(a.checkpoint, k, a.sequences, a.mc_samples)} for k in ("analytic", "posterior")}
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    print("| kernel | steps | gen. PPL (token-weighted) | gen. PPL (mean per sample) | entropy | discrete bound "
          "NLL/token ± se | PPL bound | infinite draws |")
    print("|---|---|---|---|---|---|---|---|")
    for k, r in res.items():
        g, b = r["gen"], r["bound"]
        print(f"| {k} | {g['steps']} | {g['ppl_token_weighted']:.1f} | {g['ppl_mean_per_sample']:.1f} | "
              f"{g['entropy']:.3f} | {b['nll_per_token']:.3f} ± {b['stderr']:.3f} | {b['ppl']:.1f} | "
              f"{b['n_infinite']} of {b['draws']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
