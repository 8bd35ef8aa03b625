"""lm-evaluation-harness (hdlm.harness, ``hdlm eval harness``) on tiny local tasks (task YAML + JSONL
files written here; nothing downloaded) with tiny untrained checkpoints.

An untrained model's head is zero, so a Quench + SHIFTED (AR) checkpoint predicts every token
uniformly: log p(continuation | context) = −(its number of tokens) · log N exactly. With the
character tokenizer (one token per character) every expected number below follows by hand.
"""

from __future__ import annotations

import json
import logging
import math
import re

import pytest

pytest.importorskip("lm_eval")

from conftest import char_tokenizer_dir  # noqa: E402
from hdlm.checkpoint import save_pretrained  # noqa: E402
from hdlm.config import Config, ModelConfig, ProcessConfig  # noqa: E402
from hdlm.errors import HDLMError  # noqa: E402
from hdlm.model import HDLMTransformer  # noqa: E402
from hdlm.tokenizers import load_tokenizer  # noqa: E402

D = 16
MC = [  # (context, choices, label: the shortest choice, which a uniform model prefers)
    ("the cat", ["sat", "ran on", "is on a mat"], 0),
    ("a dog", ["ran far away", "sat", "is big"], 1),
    ("the man", ["was here now", "saw it all", "ran"], 2),
]
ROLL = ["the cat sat on the mat and then it ran away to the big red hat", "a dog"]
GEN = [("the cat sat on the", "mat"), ("one two", "three")]
TASKS = {
    "tiny_mc": {"output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]},
    "tiny_roll": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                  "metric_list": [{"metric": "word_perplexity"}]},
    "tiny_gen": {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
                 "generation_kwargs": {"until": ["."], "max_gen_toks": 5, "do_sample": False},
                 "metric_list": [{"metric": "exact_match"}]},
}


def _task_yaml(name: str, data: str, spec: dict) -> str:
    import yaml

    return yaml.safe_dump({"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
                           "test_split": "test", **spec}, sort_keys=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    tok_dir = char_tokenizer_dir(root / "tok")
    tok = load_tokenizer(str(tok_dir))
    tasks = root / "tasks"
    tasks.mkdir()
    rows = {"tiny_mc": [{"context": c, "choices": ch, "label": y} for c, ch, y in MC],
            "tiny_roll": [{"text": t} for t in ROLL], "tiny_gen": [{"prompt": p, "answer": a} for p, a in GEN]}
    for name, spec in TASKS.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
        (tasks / f"{name}.yaml").write_text(_task_yaml(name, str(data), spec))
    ckpts = {}
    for label, configuration, kind, process in (("ar", "shifted", "quench", "mdlm"), ("mdlm", "aligned", "flat", "mdlm")):
        cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, length=D, n_layers=1, hidden=16, n_heads=2,
                                       cond_dim=8, dropout=0.0, pad_vocab_to=8, configuration=configuration,
                                       time_conditioning=False),
                     process=ProcessConfig(kind=process))
        cfg = cfg.replace({"data.tokenizer": str(tok_dir), "schedule.kind": kind, "schedule.steps": 4
                           if kind == "flat" else None})
        ckpts[label] = str(save_pretrained(HDLMTransformer(cfg.model), cfg, tok.identity(), root / label))
    return {"tok": tok, "tasks": str(tasks), "ckpt": ckpts, "logN": math.log(tok.vocab_size)}


def test_ar_loglikelihood_is_exact_and_tokenised_like_hf_models(world):
    from hdlm.harness import HDLMHarnessLM

    lm = HDLMHarnessLM(world["ckpt"]["ar"], device="cpu")
    assert lm.chain.ar and "EXACT" in lm.likelihood_kind
    # the context's trailing space moves to the continuation: " sat" is 4 tokens either way
    assert lm.encode_pair("the cat ", "sat") == lm.encode_pair("the cat", " sat")
    ctx, cont = lm.encode_pair("the cat", " sat")
    assert len(ctx) == 7 and len(cont) == 4
    logp, greedy = lm.score(ctx, cont)
    assert logp == pytest.approx(-4 * world["logN"], rel=1e-9) and greedy is False  # argmax of zeros is id 0
    # a long context is cut from the left to fit d
    ctx, cont = lm.encode_pair("x" * 40, " sat")
    assert len(ctx) + len(cont) == D and len(cont) == 4


def test_cli_runs_local_tasks_with_the_numbers_worked_out_by_hand(world, tmp_path, capsys):
    from hdlm.cli import main

    out = tmp_path / "h.json"
    assert main(["eval", "harness", "--checkpoint", world["ckpt"]["ar"], "--tasks", "tiny_mc,tiny_roll,tiny_gen",
                 "--include-path", world["tasks"], "--device", "cpu", "--log-samples", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny_mc" in printed and "loglikelihood is EXACT" in printed
    res = json.loads(out.read_text())
    assert res["hdlm"]["likelihood"] == "exact" and res["hdlm"]["command"].startswith("hdlm eval harness")
    r = res["results"]
    assert r["tiny_mc"]["acc,none"] == 1.0  # uniform per token: the shortest choice always wins
    for s in res["samples"]["tiny_mc"]:  # each choice scored −(1 + len(choice)) log N (the leading space)
        choices = s["doc"]["choices"]
        got = [float(resp[0][0]) for resp in s["resps"]]
        assert got == pytest.approx([-(1 + len(c)) * world["logN"] for c in choices], rel=1e-9)
    # rolling windows of at most d tokens: every character scored exactly once
    n_chars, n_words = sum(map(len, ROLL)), sum(len(re.split(r"\s+", t)) for t in ROLL)
    assert r["tiny_roll"]["word_perplexity,none"] == pytest.approx(math.exp(n_chars * world["logN"] / n_words),
                                                                  rel=1e-6)
    for s in res["samples"]["tiny_gen"]:  # 5 tokens at most (the word-level decoder joins them with spaces)
        text = s["resps"][0][0]
        assert "." not in text and len(text.replace(" ", "")) <= 5


def test_generate_until_cuts_at_eos_and_stop_strings(world, monkeypatch):
    from lm_eval.api.instance import Instance

    from hdlm.harness import HDLMHarnessLM

    lm = HDLMHarnessLM(world["ckpt"]["ar"], device="cpu")
    tok, seen = world["tok"], []

    def fake_generate(ctx, n_new, greedy, temperature=None):
        seen.append((len(ctx), n_new, greedy, temperature))
        return (tok.encode("ab.cd") + [tok.eos_id] + tok.encode("ef"))[:n_new]

    monkeypatch.setattr(lm, "_generate", fake_generate)
    req = lambda ctx, kw: Instance("generate_until", {}, (ctx, kw), 0)  # noqa: E731
    texts = lm.generate_until([req("x" * 30, {"until": ["."], "max_gen_toks": 6, "do_sample": False}),
                               req("hi", {"until": "zz", "max_gen_toks": 100, "temperature": 0.7}),
                               req("hi", {"until": ["c"], "max_gen_toks": 2})], disable_tqdm=True)
    assert [t.replace(" ", "") for t in texts] == ["ab", "ab.cd", "ab"]  # stop string; EOS; max_gen_toks
    # the context is cut from the left to leave max_gen_toks (at most d - 1) positions to generate
    assert seen == [(D - 6, 6, True, None), (1, D - 1, False, 0.7), (2, 2, False, 1.0)]


def test_simple_evaluate_by_name_states_the_bound(world, caplog):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import hdlm.harness  # noqa: F401  registers "hdlm"

    with caplog.at_level(logging.WARNING, logger="hdlm.harness"):
        res = lm_eval.simple_evaluate(model="hdlm", model_args=f"checkpoint={world['ckpt']['mdlm']},mc_samples=2,"
                                      "greedy_check=false,device=cpu", tasks=["tiny_mc"], limit=2,
                                      task_manager=TaskManager(include_path=world["tasks"], include_defaults=False))
    assert "UPPER BOUND on the NLL" in caplog.text and "'ancestral' kernel under flat T=4" in caplog.text
    assert res["config"]["model"] == "hdlm" and 0.0 <= res["results"]["tiny_mc"]["acc,none"] <= 1.0


def test_bound_model_scores_are_finite_bounds(world):
    from hdlm.harness import HDLMHarnessLM

    lm = HDLMHarnessLM(world["ckpt"]["mdlm"], device="cpu", mc_samples=4, greedy_check="false")
    logp, greedy = lm.score(*lm.encode_pair("the cat", " sat"))
    # the bound on −log p is >= the exact −log p >= 0 ... and an untrained MDLM's clean prediction is uniform
    assert math.isfinite(logp) and logp <= 0 and greedy is False
    assert lm.provenance()["likelihood"] == "bound" and lm.provenance()["mc_samples"] == 4
    # is_greedy of a non-AR model: the samplers' top-k = 1 decode from the context must give the continuation
    checked = HDLMHarnessLM(world["ckpt"]["mdlm"], device="cpu", mc_samples=1)
    ctx, cont = checked.encode_pair("the cat", " sat")
    decoded = checked._greedy_decode(ctx, len(cont))
    assert len(decoded) == len(cont) and checked.score(ctx, cont)[1] == (decoded == cont)
    checked._greedy_decode = lambda c, n: list(cont)
    assert checked.score(ctx, cont)[1] is True


def test_bad_inputs_are_one_line(world):
    from hdlm.cli import main
    from hdlm.harness import HDLMHarnessLM

    with pytest.raises(HDLMError, match="needs checkpoint=DIR"):
        HDLMHarnessLM()
    with pytest.raises(HDLMError, match="unknown model argument"):
        HDLMHarnessLM(world["ckpt"]["ar"], temperature=2)
    with pytest.raises(HDLMError, match="mc_samples = 'many'"):
        HDLMHarnessLM(world["ckpt"]["ar"], mc_samples="many")
    with pytest.raises(HDLMError, match="greedy_check = 'maybe'"):
        HDLMHarnessLM(world["ckpt"]["ar"], greedy_check="maybe")
    base = ["eval", "harness", "--checkpoint", world["ckpt"]["ar"], "--device", "cpu"]
    assert main(base + ["--tasks", "tiny_mc", "--mc-samples", "0"]) == 2
    assert main(base + ["--tasks", " , "]) == 2
    assert main(base + ["--tasks", "tiny_mc", "--include-path", "/no/such/dir"]) == 2


def test_user_guide_states_the_code_defaults():
    import inspect
    from pathlib import Path

    from hdlm.cli import build_parser
    from hdlm.harness import HDLMHarnessLM

    guide = (Path(__file__).resolve().parents[1] / "docs" / "user-guide.md").read_text()
    default = inspect.signature(HDLMHarnessLM).parameters["mc_samples"].default
    stated = int(re.search(r"`mc_samples` trajectories per request, default (\d+)", guide).group(1))
    cli = build_parser().parse_args(["eval", "harness", "--checkpoint", "x", "--tasks", "t"]).mc_samples
    assert stated == default == cli


def test_a_converted_causal_lm_is_scored_exactly_under_quench_and_bounded_under_block(tmp_path):
    """A SHIFTED ε-hybrid converted from a (tiny, random) Llama: under Quench it is that causal LM, so the
    harness's exact log-likelihood must equal the Llama's own next-token log-probabilities (over the
    tokenizer's N real tokens, the document-start token in front); under its Block schedule it is a bound."""
    transformers = pytest.importorskip("transformers")
    import torch

    from hdlm.config import load_config
    from hdlm.conversion import convert_to_folder
    from hdlm.harness import HDLMHarnessLM

    hf = char_tokenizer_dir(tmp_path / "hf")
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf / "tokenizer.json"), eos_token="<eos>").save_pretrained(hf)
    torch.manual_seed(0)
    conf = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    llama = transformers.LlamaForCausalLM(conf).eval()
    llama.save_pretrained(hf)
    cfg = load_config("smollm2-ptb-block", {"model.length": 16, "data.cache_dir": str(tmp_path / "cache")})
    folder = convert_to_folder(str(hf), cfg, tmp_path / "converted")

    lm = HDLMHarnessLM(str(folder), schedule="quench", device="cpu")
    ctx, cont = lm.encode_pair("the cat", " sat on")
    logp, greedy = lm.score(ctx, cont)
    ids = torch.tensor([[0] + ctx + cont])  # the converted model's BOS is the Llama's document start (id 0)
    with torch.no_grad():
        ref = torch.log_softmax(llama(ids).logits[0, :-1, :48].double(), -1)
    targets = torch.tensor(ctx + cont)
    expect = ref[torch.arange(len(ctx), len(ctx) + len(cont)), targets[len(ctx):]].sum()
    assert lm.chain.ar and logp == pytest.approx(float(expect), abs=1e-4)
    assert greedy == bool((ref[len(ctx):].argmax(-1) == targets[len(ctx):]).all())

    block = HDLMHarnessLM(str(folder), device="cpu", mc_samples=2, greedy_check=False)
    assert not block.chain.ar and block.hs.kind == "block" and block.chain.kernel == "ancestral"
    bound, _ = block.score(ctx, cont)
    assert math.isfinite(bound) and bound < 0
