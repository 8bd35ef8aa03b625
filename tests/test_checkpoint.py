"""Checkpoints: round trip, crash safety, corruption and mismatch errors, pretrained folders, CLI errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import hdlm.checkpoint as ckpt_lib
from hdlm.checkpoint import load_checkpoint, save_checkpoint, save_pretrained
from hdlm.hub import from_pretrained  # moved from hdlm.checkpoint, which no longer builds models
from conftest import char_tokenizer_dir
from hdlm.config import load_config
from hdlm.errors import HDLMError
from hdlm.model import HDLMTransformer

N = 40


def tiny_config(**over):
    base = {"model.vocab_size": N, "model.length": 16, "model.n_layers": 1, "model.hidden": 16,
            "model.n_heads": 2, "model.cond_dim": 8, "model.pad_vocab_to": 8, "schedule.width": 4}
    base.update(over)
    return load_config("tiny-ptb", base)


def identity(name="chars", vocab_hash="abc123"):
    return {"name": name, "vocab_hash": vocab_hash, "vocab_size": N}


def make_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = HDLMTransformer(cfg.model)
    with torch.no_grad():  # adaLN-Zero starts some tensors at 0: randomise all so a mix-up shows
        for p in model.parameters():
            p.normal_()
    return model


def rng_snapshot():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_round_trip_weights_config_tokenizer_rng_ema(tmp_path):
    cfg = tiny_config()
    model = make_model(cfg)
    ema = {k: v + 1.0 for k, v in model.state_dict().items()}
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = {"rng": [rng_snapshot()], "data": [{"epoch": 2, "position": 7}], "metrics": [{"step": 5, "loss": 1.5}],
             "numpy_thing": np.arange(5, dtype=np.int16), "tuple": (1, (2, 3))}
    expected = draws()
    path = save_checkpoint(tmp_path / "run", 5, model, cfg, identity(), state, ema=ema)
    assert path.name == "step-00000005"
    assert (tmp_path / "run" / "latest").read_text().strip() == path.name
    random.seed(9), np.random.seed(9), torch.manual_seed(9)  # move every generator on

    ck = load_checkpoint(tmp_path / "run")  # a run folder resolves through `latest`
    assert ck.path == path and ck.step == 5 and ck.train_state["step"] == 5
    assert ck.config.to_dict() == cfg.to_dict()
    assert ck.tokenizer == identity()
    for name, t in model.state_dict().items():
        assert torch.equal(ck.model_state[name], t), name
        assert torch.equal(ck.ema_state[name], t + 1.0), name
    rng = ck.train_state["rng"][0]
    random.setstate(rng["python"]), np.random.set_state(rng["numpy"]), torch.set_rng_state(rng["torch"])
    assert draws() == expected
    assert ck.train_state["data"] == [{"epoch": 2, "position": 7}]
    assert ck.train_state["metrics"] == [{"step": 5, "loss": 1.5}]
    arr = ck.train_state["numpy_thing"]
    assert isinstance(arr, np.ndarray) and arr.dtype == np.int16 and arr.tolist() == [0, 1, 2, 3, 4]
    assert ck.train_state["tuple"] == (1, (2, 3))
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 5 and set(meta["sha256"]) == {"model.safetensors", "ema.safetensors", "state.pt"}


def test_latest_and_keep_last_k(tmp_path):
    cfg = tiny_config()
    run = tmp_path / "run"
    for step in (1, 2, 3):
        save_checkpoint(run, step, make_model(cfg, seed=step), cfg, identity(), {}, keep=2)
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["step-00000002", "step-00000003"]
    ck = load_checkpoint(run)
    assert ck.step == 3
    assert torch.equal(ck.model_state["token_embedding"], make_model(cfg, seed=3).token_embedding.detach())


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize("crash_at", range(7))
def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch, crash_at):
    """A crash after `crash_at` files (0-5) or between publishing the folder and `latest` (6)."""
    cfg = tiny_config()
    run = tmp_path / "run"
    old = make_model(cfg, seed=1)
    save_checkpoint(run, 10, old, cfg, identity(), {"note": "old"}, ema=old.state_dict())

    calls = {"n": 0}
    real_write, real_latest = ckpt_lib._write_file, ckpt_lib._write_latest

    def crashing_write(path, write, binary=True):
        if calls["n"] == crash_at:
            raise Crash(f"killed before writing {path.name}")
        calls["n"] += 1
        real_write(path, write, binary)

    def crashing_latest(run_dir, name):
        raise Crash("killed before replacing latest")

    if crash_at < 6:
        monkeypatch.setattr(ckpt_lib, "_write_file", crashing_write)
    else:
        monkeypatch.setattr(ckpt_lib, "_write_latest", crashing_latest)
    new = make_model(cfg, seed=2)
    with pytest.raises(Crash):
        save_checkpoint(run, 20, new, cfg, identity(), {"note": "new"}, ema=new.state_dict())
    monkeypatch.setattr(ckpt_lib, "_write_file", real_write)
    monkeypatch.setattr(ckpt_lib, "_write_latest", real_latest)

    assert (run / "latest").read_text().strip() == "step-00000010"
    ck = load_checkpoint(run)
    assert ck.step == 10 and ck.train_state["note"] == "old"
    assert torch.equal(ck.model_state["token_embedding"], old.token_embedding.detach())
    # the next save succeeds and removes the leftovers of the interrupted one
    path = save_checkpoint(run, 30, new, cfg, identity(), {"note": "next"})
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]
    assert load_checkpoint(run).path == path


def _save_one(tmp_path):
    cfg = tiny_config()
    return save_checkpoint(tmp_path / "run", 1, make_model(cfg), cfg, identity(), {"x": 1})


def test_corrupt_weights_are_refused_naming_the_file(tmp_path):
    path = _save_one(tmp_path)
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF  # inside the tensor data: the file still parses, only the hash can tell
    f.write_bytes(bytes(data))
    with pytest.raises(HDLMError, match="model.safetensors.*corrupt"):
        load_checkpoint(path)


def test_truncated_state_is_refused(tmp_path):
    path = _save_one(tmp_path)
    f = path / "state.pt"
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(HDLMError, match="state.pt.*corrupt"):
        load_checkpoint(tmp_path / "run")


def test_missing_folder_and_missing_file(tmp_path):
    with pytest.raises(HDLMError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")
    path = _save_one(tmp_path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(HDLMError, match="missing file tokenizer.json"):
        load_checkpoint(path)


def test_config_that_does_not_validate(tmp_path):
    path = _save_one(tmp_path)
    f = path / "config.yaml"
    f.write_text(f.read_text().replace("n_layers: 1", "n_layers: 0"))
    with pytest.raises(HDLMError, match=r"config.yaml.*model.n_layers = 0"):
        load_checkpoint(path)


def test_pretrained_uses_ema_weights(tmp_path):
    cfg = tiny_config()
    model = make_model(cfg, seed=4)
    ema_model = make_model(cfg, seed=5)
    save_pretrained(model, cfg, identity(), tmp_path / "pre", ema=ema_model.state_dict())
    loaded, cfg2, tok = from_pretrained(tmp_path / "pre")
    assert cfg2.to_dict() == cfg.to_dict() and tok == identity() and not loaded.training
    for name, t in ema_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    # a training checkpoint works too, and also prefers its EMA weights
    path = save_checkpoint(tmp_path / "run", 3, model, cfg, identity(), {}, ema=ema_model.state_dict())
    loaded, _, _ = from_pretrained(path)
    assert torch.equal(loaded.token_embedding, ema_model.token_embedding)
    # weights that do not fit the config are one clear error
    bad = tiny_config(**{"model.hidden": 32})
    (tmp_path / "pre" / "config.yaml").write_text(bad.to_yaml())
    with pytest.raises(HDLMError, match="do not fit the model"):
        from_pretrained(tmp_path / "pre")


def test_tied_embeddings_save(tmp_path):
    cfg = tiny_config(**{"model.tie_embeddings": True})
    model = make_model(cfg)
    path = save_checkpoint(tmp_path / "run", 1, model, cfg, identity(), {})
    loaded, _, _ = from_pretrained(path)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_init_from_refuses_a_mismatched_tokenizer(tmp_path):
    from hdlm.train import train

    tok = char_tokenizer_dir(tmp_path / "tok")
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat\n" * 50)
    cfg = tiny_config(**{"model.vocab_size": 0, "data.tokenizer": str(tok), "data.dataset": str(text),
                         "data.cache_dir": str(tmp_path / "cache"), "train.out_dir": str(tmp_path / "out"),
                         "train.device": "cpu"})
    other = tiny_config(**{"model.vocab_size": 48})
    stage1 = save_checkpoint(tmp_path / "stage1", 1, make_model(other), other,
                             {"name": "gpt2", "vocab_hash": "0" * 64, "vocab_size": 48}, {})
    with pytest.raises(HDLMError, match="tokenizer mismatch"):
        train(cfg.replace({"train.init_from": str(stage1)}))


def test_cli_bad_config_value_is_one_line_and_status_2(capsys):
    from hdlm.cli import main

    assert main(["train", "--set", "model.n_layers=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.n_layers" in err
