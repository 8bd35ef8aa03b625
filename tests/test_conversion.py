"""`hdlm convert` and fine-tuning a converted model (hdlm.conversion; docs/conversion.md).

The pretrained model is a tiny randomly initialised Llama saved as a local Hugging Face folder with a
character-level tokenizer (no download, no GGUF); the corpus is the toy word corpus of tests/test_train.py.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import char_tokenizer_dir  # noqa: E402
from hdlm.checkpoint import load_checkpoint, read_config  # noqa: E402
from hdlm.hub import from_pretrained  # noqa: E402
from hdlm.cli import main as cli_main  # noqa: E402
from hdlm.config import load_config  # noqa: E402
from hdlm.conversion import convert  # noqa: E402
from hdlm.errors import HDLMError  # noqa: E402
from hdlm.evaluation.likelihood import perplexity_bound  # noqa: E402
from hdlm.hf_backbone import HFBackbone  # noqa: E402
from hdlm.tokenizers import load_tokenizer  # noqa: E402
from hdlm.train import train  # noqa: E402

WORDS = ("the cat dog sat ran on a mat hat big small red blue and then it was here there one two "
         "three new old man saw").split()
ROWS = 50  # HF embedding/head rows: more than the tokenizer's N = 48 (a padded vocabulary)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("conversion")
    rng = random.Random(0)
    text = root / "text.txt"
    text.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + " .\n"
                            for _ in range(300)))
    hf = char_tokenizer_dir(root / "hf")  # tokenizer.json, then the model and tokenizer_config beside it
    transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf / "tokenizer.json"), eos_token="<eos>").save_pretrained(hf)
    torch.manual_seed(0)
    conf = transformers.LlamaConfig(vocab_size=ROWS, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                    bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(conf).save_pretrained(hf)
    return {"hf": str(hf), "text": str(text), "cache": str(root / "cache")}


def overrides(assets, out_dir, **extra):
    base = {"model.length": 32, "data.dataset": assets["text"], "data.cache_dir": assets["cache"], "train.steps": 16,
            "train.batch_size": 8, "train.lr": 3e-3, "train.warmup": 3, "train.log_every": 8, "train.eval_every": 8,
            "train.eval_batches": 2, "train.save_every": 8, "train.device": "cpu", "train.out_dir": str(out_dir)}
    base.update(extra)
    return base


def test_convert_cli_writes_a_pretrained_folder_that_round_trips(assets, tmp_path, capsys):
    """Catches: a converted folder that does not rebuild the same network (config, weights, MASK/BOS rows,
    tokenizer), and a bad source that is not one clear line with status 2."""
    out = tmp_path / "converted"
    args = ["convert", "--from", assets["hf"], "--out", str(out)] + \
        [f"{k}={v}" for k, v in overrides(assets, tmp_path / "run").items()]
    assert cli_main(args) == 0
    assert "fine-tune with: hdlm train --config" in capsys.readouterr().out
    cfg = read_config(out)
    assert (cfg.model.backbone, cfg.model.vocab_size, cfg.model.shift) == ("hf", 48, 1)
    assert cfg.model.hf_config["model_type"] == "llama" and cfg.model.hf_source == assets["hf"]
    assert Path(cfg.data.tokenizer) == Path(assets["hf"]).resolve()  # the model's own tokenizer, recorded
    model, cfg2, identity = from_pretrained(out)
    assert isinstance(model, HFBackbone) and identity == load_tokenizer(cfg.data.tokenizer).identity()
    fresh, _, _ = convert(assets["hf"], load_config("smollm2-ptb-block", overrides(assets, tmp_path / "run")))
    y = torch.randint(48, (2, 32))
    with torch.no_grad():
        assert torch.equal(model(y, None), fresh.eval()(y, None))
        # BOS starts as the model's document-start token (here its EOS, id 0); MASK as the mean embedding
        emb = fresh.decoder.embed_tokens.weight
        assert torch.equal(fresh.special_embedding[1], emb[0])
        assert torch.allclose(fresh.special_embedding[0], emb[:48].mean(0))
    capsys.readouterr()
    assert cli_main(["convert", "--from", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0]


@pytest.mark.slow
def test_finetuning_reduces_the_block_bound_and_resumes_exactly(assets, tmp_path):
    """A real learning check on the converted model (the discrete Block bound on held-out text drops),
    and checkpoints of converted models save, resume and load like DiT ones (bit-exact resume)."""
    folder = tmp_path / "converted"
    cfg0 = load_config("smollm2-ptb-block", overrides(assets, tmp_path / "full"))
    model0, cfg, tokenizer = convert(assets["hf"], cfg0)
    from hdlm.checkpoint import save_pretrained
    from hdlm.data import load_split

    save_pretrained(model0, cfg, tokenizer.identity(), folder)
    valid = load_split(cfg.data, "valid", tokenizer, cfg.model.length).gather(list(range(8)))

    def block_bound(model) -> float:
        return perplexity_bound(model, cfg, valid, mc_samples=4, seed=1, progress=False).nll_per_token

    before = block_bound(model0)
    run = cfg.replace({"train.init_from": str(folder)})
    train(run)
    trained, _, _ = from_pretrained(tmp_path / "full")
    after = block_bound(trained)
    print(f"block bound before {before:.3f}, after {after:.3f} nats/token")
    assert after < before - 0.3, (before, after)
    # the same run, killed after 8 steps and resumed, ends with the same weights
    cut = run.replace({"train.out_dir": str(tmp_path / "cut")})
    assert train(cut, stop_after=8)["stopped"]
    train(cut, resume=str(tmp_path / "cut"))
    a, b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "cut")
    assert a.step == b.step == 16
    for name, t in a.model_state.items():
        assert torch.equal(t, b.model_state[name]), name


def test_sources_and_bad_input(assets, tmp_path):
    from hdlm.conversion import resolve_source

    folder, source = resolve_source(assets["hf"])
    assert folder == Path(assets["hf"]) and source == assets["hf"]
    (tmp_path / "nocfg").mkdir()
    with pytest.raises(HDLMError, match="config.json"):
        resolve_source(str(tmp_path / "nocfg"))
    with pytest.raises(HDLMError, match="never downloads"):
        resolve_source("someone/not-cached-model")
    with pytest.raises(HDLMError, match="hf_config"):  # a preset alone does not build a model
        from hdlm.backbone import build_model

        build_model(load_config("smollm2-ptb-block", {"model.vocab_size": 48}).model)


def test_conversion_doc_states_the_presets_and_the_layout_cost():
    """docs/conversion.md's numbers: the presets' hybrid, and 2d + d/ω training cells with the head at 2d."""
    from hdlm.objective import build_objective

    text = (Path(__file__).resolve().parents[1] / "docs" / "conversion.md").read_text()
    for name, kind in (("smollm2-ptb-block", "block"), ("smollm2-ptb-slide", "slide")):
        cfg = load_config(name)
        assert (cfg.model.backbone, cfg.model.configuration, cfg.process.kind, cfg.schedule.kind) == \
            ("hf", "shifted", "epsilon", kind)
        for stated in (f"ε = {cfg.process.epsilon:g}", f"ω = {cfg.schedule.width}", f"d = {cfg.model.length}"):
            assert stated in text, stated
    d, w = 16, 4
    cfg = load_config("smollm2-ptb-block", {"model.length": d, "model.vocab_size": 11, "schedule.width": w})
    tc = build_objective(cfg, 11).cells(torch.randint(11, (2, d)), torch.tensor([1, 2]), 0)
    assert len(tc.cells.layout) == 2 * d + d // w and tc.ce_index.numel() + tc.diff_index.numel() == 2 * d
    assert "2d + d/ω cells" in text
