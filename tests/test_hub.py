"""Every entry point takes a published checkpoint (folder or Hub id, offline from the HF cache);
hdlm's own checkpoints are Hub-native and self-contained (docs/checkpoints.md)."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import char_tokenizer_dir
from hdlm.checkpoint import save_checkpoint
from hdlm.cli import main
from hdlm.config import load_config
from hdlm.errors import HDLMError
from hdlm.hub import load_pretrained
from hdlm.model import HDLMTransformer
from hdlm.official.compat import official_forward
from hdlm.processes import make_process
from hdlm.sampling import HDLMPipeline, generate, make_sampler
from hdlm.hyperschedule import from_config
from hdlm.tokenizers import from_path

FIXTURES = Path(__file__).parent / "fixtures" / "official-hdlm"
REPO_FILES = ("config.json", "config.yaml", "generation_config.json", "model.safetensors")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def word_tokenizer(folder: Path, n: int = 61) -> Path:
    """A word-level tokenizer of n tokens (<eos> = 0, w1 … w{n-1}) saved as folder/tokenizer.json."""
    import tokenizers as hf

    vocab = {"<eos>": 0, **{f"w{i}": i for i in range(1, n)}}
    tk = hf.Tokenizer(hf.models.WordLevel(vocab, unk_token="<eos>"))
    tk.pre_tokenizer = hf.pre_tokenizers.Whitespace()
    tk.add_special_tokens([hf.AddedToken("<eos>", special=True)])
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    return folder


def official_copy(tmp_path: Path, name: str, files=REPO_FILES, tokenizer: bool = True) -> Path:
    """A writable copy of an official fixture repo (optionally with a 61-token tokenizer.json)."""
    out = tmp_path / name
    out.mkdir(parents=True)
    for f in files:
        shutil.copy(FIXTURES / name / f, out / f)
    if tokenizer:
        word_tokenizer(out)
    return out


def hub_cache(root: Path, repo_id: str, src: Path) -> Path:
    """A hand-built Hugging Face cache: models--org--name/{refs/main, snapshots/<commit>/files}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for f in src.iterdir():
        shutil.copy(f, snap / f.name)
    return root


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# --------------------------------------------------------------------------------------------
# official checkpoints by Hub id, offline


@pytest.mark.parametrize("name", ["epsilon", "epsilon_std0.5", "gamma", "gamma_std0.5"])
def test_fixture_files_are_the_official_ones(name):
    """The copied fixture files hash to what the official run recorded (reference.json)."""
    from hdlm.checkpoint import sha256_file

    recorded = json.loads((FIXTURES / name / "reference.json").read_text())["files"]
    present = [f for f in recorded if (FIXTURES / name / f).exists()]
    assert "model.safetensors" in present and "reference.safetensors" in present
    for f in present:
        assert sha256_file(FIXTURES / name / f) == recorded[f]["sha256"], f


def test_offline_by_repo_id_from_the_hf_cache(tmp_path):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    cache = hub_cache(tmp_path / "hub", "hdlm-group/hdlm-fixture-gamma", official_copy(tmp_path, "gamma"))
    pre = load_pretrained("hdlm-group/hdlm-fixture-gamma", cache_dir=cache)
    assert pre.format == "official" and pre.path.name == COMMIT and pre.tokenizer.vocab_size == 61
    r = load_file(str(FIXTURES / "gamma" / "reference.safetensors"))
    out = official_forward(pre.model, pre.config, r["input.xt"], r["input.positions"], sigma=r["a.sigma"])
    assert float((out - r["a.log_score.float32"]).abs().max()) <= 1e-5
    # local_files_only says the same thing as HF_HUB_OFFLINE
    again = load_pretrained("hdlm-group/hdlm-fixture-gamma", cache_dir=cache, local_files_only=True, tokenizer=False)
    assert again.tokenizer is None and torch.equal(again.model.token_embedding, pre.model.token_embedding)


def test_pytorch_model_bin_is_read_when_there_is_no_safetensors(tmp_path):
    """Only pytorch_model.bin in the cached repo: read with weights_only=True, same weights."""
    src = official_copy(tmp_path, "epsilon", files=("config.json", "pytorch_model.bin"), tokenizer=False)
    cache = hub_cache(tmp_path / "hub", "hdlm-group/hdlm-fixture-epsilon-bin", src)
    pre = load_pretrained("hdlm-group/hdlm-fixture-epsilon-bin", cache_dir=cache, tokenizer=False)
    assert pre.weights.name == "pytorch_model.bin"
    st = load_pretrained(FIXTURES / "epsilon", tokenizer=False)
    assert st.weights.name == "model.safetensors"
    for k, v in st.model.state_dict().items():
        assert torch.equal(pre.model.state_dict()[k], v), k


def test_cli_sample_by_repo_id(tmp_path, monkeypatch, capsys):
    """`hdlm sample --checkpoint org/name` resolves through the default HF cache, offline."""
    import huggingface_hub.constants as hf_constants

    cache = hub_cache(tmp_path / "hub", "hdlm-group/hdlm-fixture-gamma", official_copy(tmp_path, "gamma"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    assert main(["sample", "--checkpoint", "hdlm-group/hdlm-fixture-gamma", "--num-samples", "2", "--seed", "1",
                 "--json", "--no-progress"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ids = [s["token_ids"] for s in out]
    assert len(ids) == 2 and all(len(row) == 16 and max(row) < 61 for row in ids)
    hs = out[0]["sampler"]["hyperschedule"]
    assert hs["kind"] == "block" and hs["levels"] == 7  # tau 8 -> 7 levels
    assert main(["sample", "--checkpoint", "hdlm-group/not-cached", "--no-progress"]) == 2
    assert "is not in the Hugging Face cache" in one_error_line(capsys)


def _renamed(d: Path) -> None:
    st = load_file(str(d / "model.safetensors"))
    st["blocks.0.attn.qkv.weight"] = st.pop("blocks.0.attn_qkv.weight")
    save_file(st, str(d / "model.safetensors"))


def _missing(d: Path) -> None:
    st = load_file(str(d / "model.safetensors"))
    del st["sigma_map.mlp.2.bias"]
    save_file(st, str(d / "model.safetensors"))


def _prefixed(d: Path) -> None:  # what a DDP state dict looks like; strict=False would leave all random
    st = load_file(str(d / "model.safetensors"))
    save_file({"module." + k: v for k, v in st.items()}, str(d / "model.safetensors"))


def _truncated(d: Path) -> None:
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])


def _config(**changes):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        for dotted, value in changes.items():
            node = cfg
            *head, last = dotted.split(".")
            for part in head:
                node = node[part]
            node[last] = value
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


BAD = {
    "renamed key": (_renamed, "missing 'blocks.0.attn_qkv.weight'"),
    "missing key": (_missing, "missing 'sigma_map.mlp.2.bias'"),
    "module. prefix": (_prefixed, "missing 'vocab_embed.embedding'"),
    "truncated safetensors": (_truncated, "corrupt or unreadable"),
    "uniform graph": (_config(**{"graph.type": "uniform"}), "graph.type = 'uniform'"),
    "AR post-processing": (_config(**{"annealing.sampling_method": "AR"}), "sampling_method 'AR'"),
    "simple annealing": (_config(**{"annealing.type": "simple"}), "annealing.type = 'simple'"),
    "geometric noise": (_config(**{"noise.type": "geometric"}), "noise.type = 'geometric'"),
    "no scale_by_sigma": (_config(**{"model.scale_by_sigma": False}), "scale_by_sigma"),
    "shifted": (_config(type="shifted"), "type = 'shifted'"),
    "hidden not divisible": (_config(**{"model.n_heads": 3}), "model.hidden = 32: must be divisible"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_official_checkpoint_is_one_line_and_exit_2(tmp_path, capsys, case):
    edit, message = BAD[case]
    d = official_copy(tmp_path, "gamma")
    edit(d)
    assert main(["sample", "--checkpoint", str(d), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert message in line, line


def test_truncated_pytorch_model_bin_is_one_line_and_exit_2(tmp_path, capsys):
    d = official_copy(tmp_path, "epsilon", files=("config.json", "pytorch_model.bin"))
    f = d / "pytorch_model.bin"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    assert main(["sample", "--checkpoint", str(d), "--no-progress"]) == 2
    assert "pytorch_model.bin is corrupt or unreadable" in one_error_line(capsys)


EXECUTED: list = []


def _mark() -> int:
    EXECUTED.append(1)
    return 0


class Payload:
    """Unpickling this runs _mark: what a malicious pytorch_model.bin would do."""

    def __reduce__(self):
        return (_mark, ())


def test_pytorch_model_bin_is_loaded_with_weights_only(tmp_path, capsys):
    """A .bin that carries code is refused before that code can run (torch.load weights_only=True)."""
    d = official_copy(tmp_path, "epsilon", files=("config.json",))
    state = load_file(str(FIXTURES / "epsilon" / "model.safetensors"))
    torch.save({**state, "payload": Payload()}, d / "pytorch_model.bin")
    assert main(["sample", "--checkpoint", str(d), "--no-progress"]) == 2
    assert "pytorch_model.bin is corrupt or unreadable" in one_error_line(capsys)
    assert EXECUTED == []


def test_missing_tokenizer_falls_back_to_bundled_gpt2_and_checks_its_size(tmp_path):
    """No tokenizer files: hdlm's GPT-2 (N = 50257) is used only when tokenizer.tokens says 50257."""
    from hdlm.official import official_tokenizer

    d = official_copy(tmp_path, "gamma", tokenizer=False)
    with pytest.raises(HDLMError, match="bundled GPT-2 tokenizer.*N = 50257.*tokenizer.tokens = 61"):
        load_pretrained(d)
    assert load_pretrained(d, tokenizer=False).model.n_real == 61
    cfg = load_pretrained(d, tokenizer=False).config.replace({"model.vocab_size": 50257})
    tok = official_tokenizer(d, cfg)
    assert tok.name == "gpt2" and tok.vocab_size == 50257 and tok.eos_id == 50256


# --------------------------------------------------------------------------------------------
# sampling, evaluation and Stage 2 from an official checkpoint


@pytest.mark.parametrize("name", ["epsilon", "gamma", "gamma_std0.5"])
def test_official_model_samples_with_the_kv_cache_exactly(name):
    """The KV-cached driver on a loaded official model: cached == uncached tokens (batch 3), the
    cache is really used, and no MASK is left."""
    pre = load_pretrained(FIXTURES / name, tokenizer=False)
    cfg = pre.config
    process = make_process(cfg.process, cfg.model.vocab_size)
    hs = from_config(cfg.schedule, cfg.model.length)
    sampler = make_sampler("auto", process, hyperschedule=hs)
    cached = []
    out = {}
    for kv in (True, False):
        gen = torch.Generator().manual_seed(3)
        out[kv] = generate(pre.model, process, hs, sampler, 3, generator=gen, kv_cache=kv, progress=False,
                           callback=lambda info: cached.append(info.n_cached) if kv else None).tokens
    assert torch.equal(out[True], out[False])
    assert max(cached) >= 8 and (out[True] < 61).all()


def test_eval_ppl_and_stage2_train_from_an_official_checkpoint(tmp_path, capsys, monkeypatch):
    """`hdlm eval ppl --checkpoint` and `hdlm train --init-from` take the official folder. Stage 2
    keeps the official architecture: with a vanishing learning rate its checkpoint still gives
    the official reference outputs."""
    monkeypatch.chdir(tmp_path)  # the mapped config caches tokenised data under ./.hdlm_cache
    d = official_copy(tmp_path, "gamma")
    rng = random.Random(0)
    text = tmp_path / "words.txt"
    text.write_text("".join(" ".join(f"w{rng.randint(1, 60)}" for _ in range(12)) + "\n" for _ in range(400)))
    assert main(["eval", "ppl", "--checkpoint", str(d), "--data", f"{text}:test", "--mc-samples", "2",
                 "--batch-size", "4", "--json", str(tmp_path / "ppl.json")]) == 0
    record = json.loads((tmp_path / "ppl.json").read_text())
    assert record["process"]["parametrisation"] == "sedd" and 1 < record["ppl"] < float("inf")
    assert record["checkpoint_sha256"] == json.loads((FIXTURES / "gamma" / "reference.json").read_text())[
        "files"]["model.safetensors"]["sha256"]
    capsys.readouterr()
    out = tmp_path / "stage2"
    assert main(["train", "--init-from", str(d), "--out", str(out), "--device", "cpu", "--steps", "1",
                 f"data.dataset={text}", f"data.tokenizer={d}", f"data.cache_dir={tmp_path / 'cache'}",
                 "train.lr=1e-30", "train.warmup=0", "train.batch_size=4", "train.eval_batches=1"]) == 0
    pre = load_pretrained(out)
    assert pre.format == "hdlm" and pre.config.model.vocab_layout == "official"
    assert pre.config.process.parametrisation == "sedd"
    r = load_file(str(FIXTURES / "gamma" / "reference.safetensors"))
    got = official_forward(pre.model, pre.config, r["input.xt"], r["input.positions"], sigma=r["a.sigma"])
    assert float((got - r["a.log_score.float32"]).abs().max()) <= 1e-5


# --------------------------------------------------------------------------------------------
# hdlm's own checkpoints: Hub-native, self-contained


def tiny_config(tok_dir: Path, N: int, **over):
    base = {"model.vocab_size": N, "model.length": 16, "model.n_layers": 1, "model.hidden": 16, "model.n_heads": 2,
            "model.cond_dim": 8, "model.pad_vocab_to": 8, "schedule.width": 4, "data.tokenizer": str(tok_dir)}
    base.update(over)
    return load_config("tiny-ptb", base)


def random_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = HDLMTransformer(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.eval()


def test_save_pretrained_round_trip_is_bitwise(tmp_path):
    tok = from_path(char_tokenizer_dir(tmp_path / "tok"))
    cfg = tiny_config(tmp_path / "tok", tok.vocab_size)
    model = random_model(cfg)
    folder = model.save_pretrained(tmp_path / "export", cfg, tok)
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                   "tokenizer_config.json", "README.md"}
    assert json.loads((folder / "config.json").read_text())["config"] == cfg.to_dict()
    again = HDLMTransformer.from_pretrained(folder)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    x = torch.randint(0, tok.vocab_size + 1, (2, 16), generator=torch.Generator().manual_seed(1))
    sigma = torch.rand(2, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(x, sigma), again(x, sigma))
    # config.json alone (no config.yaml, no meta.json) is enough: what a Hub repo may hold
    (folder / "config.yaml").unlink()
    (folder / "meta.json").unlink()
    alone = HDLMPipeline.from_pretrained(folder)
    assert alone.config.to_dict() == cfg.to_dict() and alone.tokenizer.vocab_size == tok.vocab_size


@pytest.mark.parametrize("spec", ["gpt2", "chars"])
def test_autotokenizer_loads_the_folder_and_encodes_like_hdlm(tmp_path, spec):
    from transformers import AutoTokenizer
    import tokenizers as hf

    from hdlm.tokenizers import load_tokenizer

    tok = load_tokenizer(spec) if spec == "gpt2" else from_path(char_tokenizer_dir(tmp_path / "tok"))
    cfg = tiny_config(tmp_path / "tok", tok.vocab_size, **{"model.pad_vocab_to": 64})
    folder = HDLMPipeline(random_model(cfg), cfg, tok).save_pretrained(tmp_path / "export")
    text = "the cat sat on the mat, twice. 3 dogs $5" if spec == "chars" else "Hello world, the café costs $3.50"
    auto = AutoTokenizer.from_pretrained(str(folder))
    assert auto(text)["input_ids"] == tok.encode(text) == auto.encode(text, add_special_tokens=False)
    assert hf.Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids \
        == tok.encode(text)
    assert auto.eos_token_id == tok.eos_id and len(auto) == tok.vocab_size


def test_training_checkpoint_copied_elsewhere_samples_alone(tmp_path):
    """A training checkpoint folder moved to another place (the run and the tokenizer folder it
    was trained with deleted) samples the same tokens as before the move."""
    from hdlm.train import train

    tok_dir = char_tokenizer_dir(tmp_path / "tok")
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog ran .\n" * 80)
    cfg = tiny_config(tok_dir, 0, **{"data.dataset": str(text), "data.cache_dir": str(tmp_path / "cache"),
                                     "train.out_dir": str(tmp_path / "run"), "train.steps": 2, "train.batch_size": 4,
                                     "train.device": "cpu", "train.eval_batches": 1, "train.warmup": 1})
    result = train(cfg)
    step = Path(result["checkpoint"])
    before = HDLMPipeline.from_pretrained(tmp_path / "run").generate_ids(2, seed=5).tokens
    moved = shutil.copytree(step, tmp_path / "elsewhere" / "ckpt")
    shutil.rmtree(tmp_path / "run")
    shutil.rmtree(tok_dir)
    pipe = HDLMPipeline.from_pretrained(moved)
    assert torch.equal(pipe.generate_ids(2, seed=5).tokens, before)
    assert pipe.decode(before)[0]


def test_old_checkpoints_with_an_identity_only_tokenizer_still_load(tmp_path):
    """Checkpoints written before the whole tokenizer was saved hold only its identity: the
    tokenizer is loaded by name (data.tokenizer) and checked, as before."""
    tok = from_path(char_tokenizer_dir(tmp_path / "tok"))
    cfg = tiny_config(tmp_path / "tok", tok.vocab_size)
    path = save_checkpoint(tmp_path / "run", 1, random_model(cfg), cfg, tok.identity(), {})
    assert "vocab_hash" in json.loads((path / "tokenizer.json").read_text())
    pipe = HDLMPipeline.from_pretrained(tmp_path / "run")
    assert pipe.tokenizer.identity()["vocab_hash"] == tok.identity()["vocab_hash"]
    assert pipe.generate_ids(1, seed=0).tokens.shape == (1, 16)


def test_push_to_hub_goes_through_huggingface_hub(tmp_path, monkeypatch):
    """Not exercised against the network: HfApi is replaced by a recorder."""
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create", repo_id, kw.get("private")))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, **kw):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    tok = from_path(char_tokenizer_dir(tmp_path / "tok"))
    cfg = tiny_config(tmp_path / "tok", tok.vocab_size)
    url = HDLMPipeline(random_model(cfg), cfg, tok).push_to_hub("me/tiny", token="t0k", private=True)
    assert url == "https://huggingface.co/me/tiny"
    assert calls[0] == ("init", "t0k") and calls[1] == ("create", "me/tiny", True)
    assert calls[2][0] == "upload" and {"config.json", "model.safetensors", "tokenizer.json"} <= set(calls[2][2])
