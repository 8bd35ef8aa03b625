"""The config (pydantic v2): ranges and finiteness of every field, one-line errors, old checkpoints' keys."""

from __future__ import annotations

import dataclasses
import math

import pytest

from hdlm.config import SECTIONS, Config, ModelConfig, ScheduleConfig, load_config
from hdlm.errors import HDLMError


@pytest.mark.parametrize("override", ["train.lr=inf", "train.lr=1e400", "train.lr=.nan", "objective.beta2=inf",
                                      "process.lam=inf", "process.gamma=-.inf", "sample.temperature=1e400"])
def test_non_finite_values_are_refused_naming_the_field(override):
    key = override.split("=")[0]
    with pytest.raises(HDLMError, match=rf"^config {key} = .*: must be a finite number") as info:
        load_config("tiny-ptb", [override])
    assert "\n" not in str(info.value)


def test_every_float_field_is_finite_and_bounded():
    """No float field accepts inf, and each has a lower and an upper bound (so 1e300 fails too)."""
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            info = cls.__pydantic_fields__[f.name]
            if info.annotation is not float:
                continue
            bounds = {type(m).__name__ for m in info.metadata}
            assert bounds & {"Ge", "Gt"} and bounds & {"Le", "Lt"}, f"{name}.{f.name} has no range"
            for bad in (math.inf, -math.inf, math.nan, 1e300):
                with pytest.raises(HDLMError, match=rf"config {name}.{f.name} = "):
                    load_config(None, {f"{name}.{f.name}": bad})


def test_typos_get_a_did_you_mean_and_errors_say_what_the_field_is():
    with pytest.raises(HDLMError, match=r"unknown field 'lrr' in 'train' \(did you mean 'lr'\?\)"):
        load_config("tiny-ptb", ["train.lrr=1e-3"])
    with pytest.raises(HDLMError, match=r"unknown section 'trian' \(did you mean 'train'\?\)"):
        load_config("tiny-ptb", ["trian.lr=1e-3"])
    with pytest.raises(HDLMError, match=r"unknown field 'model.n_layer' \(did you mean 'n_layers'\?\)"):
        Config.from_dict({"model": {"n_layer": 2}})
    with pytest.raises(HDLMError, match=r"config model.n_layers = 0: must be an integer >= 1 \(number of"):
        ModelConfig(n_layers=0)
    with pytest.raises(HDLMError, match=r"config process.kind = 'gama': must be one of absorb, uniform, gamma"):
        load_config("tiny-ptb", ["process.kind=gama"])
    with pytest.raises(HDLMError, match=r"config train.steps = True: must be an integer"):
        load_config("tiny-ptb", ["train.steps=true"])  # a boolean is not a number
    with pytest.raises(HDLMError, match="not valid YAML"):
        load_config("tiny-ptb", ["train.lr=["])


def test_cross_field_rules_and_dataclass_api():
    with pytest.raises(HDLMError, match="model.hidden = 30: must be divisible by model.n_heads = 4"):
        load_config("tiny-ptb", ["model.hidden=30", "model.n_heads=4"])
    with pytest.raises(HDLMError, match="schedule.width = 999: must be in"):
        load_config("tiny-ptb", ["schedule.width=999"])
    with pytest.raises(HDLMError, match="train.betas"):
        load_config("tiny-ptb", ["train.betas=[0.9, 1.0]"])
    cfg = load_config("tiny-ptb")
    assert dataclasses.replace(cfg.schedule, kind="flat").kind == "flat"  # sections stay dataclasses
    with pytest.raises(HDLMError, match="schedule.rho"):
        dataclasses.replace(cfg.schedule, rho=-1.0)  # ... and validate
    assert load_config("tiny-ptb", ["schedule.width=none"]).schedule.width is None
    assert Config.from_dict(cfg.to_dict()) == cfg
    assert Config.from_dict(__import__("yaml").safe_load(cfg.to_yaml())) == cfg
    assert isinstance(ScheduleConfig(kind="slide", width=4), ScheduleConfig)


def test_old_float64_gumbel_key_is_read_as_draw(tmp_path):
    """Checkpoints written before `sample.draw` hold `sample.float64_gumbel`; they must still load."""
    assert Config.from_dict({"sample": {"float64_gumbel": False}}).sample.draw == "float32-gumbel"
    assert Config.from_dict({"sample": {"float64_gumbel": True}}).sample.draw == "cdf"
    old = tmp_path / "old.yaml"
    old.write_text("sample:\n  float64_gumbel: false\n")
    assert load_config(str(old)).sample.draw == "float32-gumbel"
    assert load_config("tiny-ptb", ["sample.float64_gumbel=false"]).sample.draw == "float32-gumbel"


@pytest.mark.parametrize("overrides, match", [
    (["model.vocab_layout=official", "model.tie_embeddings=true"], r"model.vocab_layout = official: needs"),
    (["model.vocab_layout=official", "model.configuration=shifted"], r"model.vocab_layout = official: needs"),
    (["process.parametrisation=sedd", "process.kind=epsilon"], r"process.parametrisation = sedd: only for the gamma"),
    (["process.parametrisation=sedd", "process.kind=mdlm"], r"process.parametrisation = sedd: only for the gamma"),
    (["model.attention=flash"], r"model.attention = 'flash': must be one of sdpa, explicit"),
])
def test_official_compatibility_options_refuse_what_they_cannot_mean(overrides, match):
    """The official layout has no BOS row (tied or SHIFTED would index past it) and the SEDD reading
    of raw outputs exists only for the score family: such configs fail at load, in one line."""
    with pytest.raises(HDLMError, match=match) as info:
        load_config("tiny-ptb", overrides)
    assert "\n" not in str(info.value)
    ok = load_config("tiny-ptb", ["process.parametrisation=sedd", "process.kind=absorb", "model.vocab_layout=official"])
    assert ok.process.parametrisation == "sedd" and ok.model.vocab_layout == "official"
