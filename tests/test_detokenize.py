"""Detokenizers (hdlm.detokenize): the SEDD / MDLM text rules of the Table 3 datasets, on strings whose
expected outputs were written by hand from the rules (not produced by the code), and their use in
the data pipeline and in ``hdlm eval ppl``.
"""

from __future__ import annotations

import json

import pytest

from hdlm import config as hconfig
from hdlm.config import Config, ModelConfig
from hdlm.detokenize import DETOKENIZERS, get_detokenizer, lambada, lm1b, ptb, scientific_papers, wikitext
from hdlm.errors import HDLMError
from hdlm.evaluation.datasets import ZERO_SHOT, resolve_data_spec


# ------------------------------------------------------------------------------------------
# the rules, one dataset at a time


def test_ptb_rules_on_the_stripped_line():
    # " 's" -> "'s", " n't" -> "n't", "\/" -> "/", " N " -> " 1 " (twice for "N N"), "$ 1" -> "$1", "<unk>" -> "?"
    line = " the company 's shares did n't rise N N % to $ N <unk> in the u.s. \\/ canada "
    assert ptb(line) == "the company's shares didn't rise 1 1 % to $1 ? in the u.s. / canada"
    # "s ' " -> "s' "; the line is stripped first, so a last "N" has no space after it and stays
    assert ptb(" the workers ' union said N ") == "the workers' union said N"
    assert ptb(" a N N N N b # N c ") == "a 1 1 1 1 b #1 c"


def test_wikitext_rules():
    assert wikitext(" = = Gameplay = = \n") == " == Gameplay ==\n"
    assert wikitext(" = = = Plot = = = \n") == " === Plot ===\n"
    raw = ' The 2 @,@ 000 @-@ year @-@ old city \'s walls ( built in 1 @.@ 5 years ) are " tall " . \n'
    assert wikitext(raw) == ' The 2,000-year-old city\'s walls (built in 1.5 years) are "tall".\n'
    assert wikitext("the players ' union : yes ; no ! why ? 5 ° C") == "the players' union: yes; no! why? 5°C"
    assert wikitext("in N years [ a ] { b }") == "in 1 years [a] {b}"


def test_lm1b_rules():
    raw = 'He said : " I \'m fine , thanks " and paid $ 5 ( or £ 3 ) at http : / / x.org / a .'
    assert lm1b(raw) == 'He said: "I\'m fine, thanks" and paid $5 (or £3) at http://x.org/a.'
    assert lm1b("Is it ? Yes ! see https : / / y.com [ 1 ] 'quoted ' ok .") == \
        "Is it? Yes! see https://y.com [1]'quoted ' ok."  # " '(\\w+)" eats the space before a quote
    assert lm1b("He left . Then she came .") == "He left. Then she came."


def test_lambada_rules():
    assert lambada("  \u201cYes,\u201d she said.\n") == '\n"Yes," she said.'


def test_scientific_papers_is_wikitext_then_lm1b():
    # WikiText's " : " -> ": " runs first, so LM1B's "http : / / " rule no longer matches (as in MDLM)
    raw = "the rate is 5 @.@ 2 % ( p < 0 @.@ 05 ) , see http : / / a.b ."
    assert scientific_papers(raw) == "the rate is 5.2 % (p < 0.05), see http:// a.b ."


def test_every_zero_shot_name_has_a_detokenizer_and_the_vocabularies_agree():
    assert tuple(DETOKENIZERS) == hconfig.DETOKENIZERS
    chosen = {name: entry[2] for name, entry in ZERO_SHOT.items()}
    assert chosen == {"ptb": "ptb", "wikitext103": "wikitext", "wikitext2": "wikitext", "lm1b": "lm1b",
                      "lambada": "lambada", "ag_news": "none", "pubmed": "scientific_papers",
                      "arxiv": "scientific_papers", "openwebtext": "none", "owt": "none"}
    assert get_detokenizer("none")("a , b") == "a , b"
    with pytest.raises(HDLMError, match="detokenizer 'sedd'"):
        get_detokenizer("sedd")


# ------------------------------------------------------------------------------------------
# chosen by the dataset name


def test_eval_data_names_choose_the_detokenizer():
    ptb_trained = Config()  # data.dataset = ptb, no detokenizer
    owt_trained = Config().replace({"data.dataset": "hf:openwebtext"})
    dc, _, label = resolve_data_spec("wikitext103", ptb_trained.data)
    assert dc.detokenizer == "wikitext" and label == "hf:wikitext:wikitext-103-raw-v1:test (detokenized: wikitext)"
    assert resolve_data_spec("hf:wikitext:wikitext-2-raw-v1:valid", ptb_trained.data)[0].detokenizer == "wikitext"
    assert resolve_data_spec("pubmed", ptb_trained.data)[0].detokenizer == "scientific_papers"
    assert resolve_data_spec("ptb", owt_trained.data)[0].detokenizer == "ptb"  # zero-shot PTB (Table 3)
    assert resolve_data_spec("ag_news", owt_trained.data)[0].detokenizer == "none"
    # the training data is evaluated as it was trained on: the checkpoint's own rules
    dc, _, label = resolve_data_spec("ptb:test", ptb_trained.data)
    assert dc.detokenizer == "none" and label == "ptb:test"
    lm1b_trained = Config().replace({"data.dataset": "hf:lm1b", "data.detokenizer": "lm1b"})
    assert resolve_data_spec("lm1b", lm1b_trained.data)[0].detokenizer == "lm1b"
    assert resolve_data_spec("wikitext2", ptb_trained.data, "none")[0].detokenizer == "none"  # explicit wins
    assert resolve_data_spec("ptb", ptb_trained.data, "ptb")[0].detokenizer == "ptb"
    with pytest.raises(HDLMError, match="--detokenize moses"):
        resolve_data_spec("ptb", ptb_trained.data, "moses")
    with pytest.raises(HDLMError, match="data.detokenizer = 'moses'"):
        Config().replace({"data.detokenizer": "moses"})


# ------------------------------------------------------------------------------------------
# in the data pipeline


def test_documents_are_detokenized_before_tokenising_and_cached_apart(tmp_path):
    from hdlm.data import load_token_stream
    from hdlm.tokenizers import load_tokenizer

    tok = load_tokenizer("gpt2")
    rows = [" = = Gameplay = = \n", " The 2 @,@ 000 @-@ year @-@ old walls . \n"]
    path = tmp_path / "wiki.jsonl"
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    cache = tmp_path / "cache"
    raw = load_token_stream(str(path), "test", tok, cache)
    detok = load_token_stream(str(path), "test", tok, cache, detokenizer="wikitext")
    expect = [i for r in rows for i in tok.encode(wikitext(r)) + [tok.eos_id]]
    assert detok.tolist() == expect
    assert raw.tolist() == [i for r in rows for i in tok.encode(r) + [tok.eos_id]] != expect
    assert len({p.name for p in cache.iterdir() if p.is_dir()}) == 2  # two cache entries, not one overwritten


def test_with_a_detokenizer_an_empty_row_is_a_lone_eos(tmp_path):
    datasets = pytest.importorskip("datasets")
    from hdlm.data import load_token_stream
    from hdlm.tokenizers import load_tokenizer

    tok = load_tokenizer("gpt2")
    folder = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": [" = A = \n", "", " b . \n"]})}).save_to_disk(
        str(folder))
    got = load_token_stream(f"hf:{folder}", "test", tok, tmp_path / "cache", detokenizer="wikitext").tolist()
    eos = tok.eos_id
    assert got == tok.encode(" = A =\n") + [eos] + [eos] + tok.encode(" b.\n") + [eos]
    plain = load_token_stream(f"hf:{folder}", "test", tok, tmp_path / "cache").tolist()
    assert plain.count(eos) == 2  # without: empty rows are skipped, as before


def test_eval_ppl_scores_the_detokenized_tokens(tmp_path):
    """Exact AR (Quench + SHIFTED) with an all-zero head: NLL = log N per token, so the JSON's token
    count says which text was scored."""
    import math

    from hdlm.checkpoint import save_pretrained
    from hdlm.cli import main
    from hdlm.model import HDLMTransformer
    from hdlm.tokenizers import load_tokenizer

    tok = load_tokenizer("gpt2")
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, length=8, n_layers=1, hidden=8, n_heads=2, cond_dim=8,
                                   dropout=0.0, configuration="shifted"))
    cfg = cfg.replace({"data.cache_dir": str(tmp_path / "cache"), "schedule.kind": "quench"})
    ckpt = save_pretrained(HDLMTransformer(cfg.model), cfg, tok.identity(), tmp_path / "ckpt")
    rows = [f" the walls ( built in {i} @.@ 5 years ) are \" tall \" . \n" for i in range(8)]
    data = tmp_path / "wiki.jsonl"
    data.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    counts = {}
    for detok, fn in (("wikitext", wikitext), ("none", str)):
        out = tmp_path / f"{detok}.json"
        assert main(["eval", "ppl", "--checkpoint", str(ckpt), "--data", str(data), "--detokenize", detok,
                     "--json", str(out)]) == 0
        record = json.loads(out.read_text())
        n = sum(len(tok.encode(fn(r))) + 1 for r in rows)
        assert record["n_tokens"] == n // 8 * 8 and record["estimator"] == "exact"
        assert record["nll_per_token"] == pytest.approx(math.log(tok.vocab_size), rel=1e-6)
        assert ("detokenized: wikitext" in record["data"]) == (detok == "wikitext")
        counts[detok] = record["n_tokens"]
    assert counts["wikitext"] < counts["none"]
    with pytest.raises(SystemExit) as bad:  # argparse's one line and status 2
        main(["eval", "ppl", "--checkpoint", str(ckpt), "--data", str(data), "--detokenize", "bogus"])
    assert bad.value.code == 2


def test_user_guide_zero_shot_table_is_the_code_table():
    import re
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "docs" / "user-guide.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| `([^`]+)`[^|]* \| `(\w+)` \|$", guide, flags=re.M)
    documented = {name: (source, detok) for name, source, detok in rows}
    assert documented == {n: (s, d) for n, (s, _, d) in ZERO_SHOT.items() if n != "owt"}  # owt: an alias
    for name in documented:  # and the commands shown for Table 3 use those names
        assert name in ("wikitext2", "openwebtext") or f"--data {name}" in guide
