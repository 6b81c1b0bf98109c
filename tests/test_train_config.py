"""TrainConfig: JSON presets, dotted --set overrides, type checks, mode rules."""

import json
from pathlib import Path

import pytest

from moebius.train.config import TrainConfig, apply_overrides, from_dict, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["distill.json", "finetune.json", "tiny-cpu.json"])
def test_presets_load_and_round_trip(name, tmp_path):
    config = load_config(CONFIGS / name)
    save_config(config, tmp_path / "c.json")
    assert load_config(tmp_path / "c.json") == config


def test_distill_preset_is_the_original_recipe():
    c = load_config(CONFIGS / "distill.json")
    assert (c.run.mode, c.run.batch_size, c.run.seed) == ("distill", 2, 42)
    assert c.run.max_steps == 200_000
    assert (c.optim.lr, c.optim.weight_decay, c.optim.warmup_steps) == (1e-4, 0.1, 0)
    assert (c.optim.max_grad_norm, c.run.noise_offset, c.data.resolution) == (1.0, 0.0357, 512)
    assert (c.model.student, c.model.teacher, c.data.mask_protocol) == (
        "released", "released", "medium_512"
    )  # fmt: skip
    assert c.run.save_every == 3000 and c.run.precision == "auto"


def test_set_overrides_use_dotted_keys_and_json_values():
    c = load_config(CONFIGS / "tiny-cpu.json", ["data.manifest=x/train.jsonl", "optim.lr=2e-3",
                                                 "run.max_steps=7", "optim.ema=true"])  # fmt: skip
    assert (c.data.manifest, c.optim.lr, c.run.max_steps, c.optim.ema) == (
        "x/train.jsonl", 2e-3, 7, True
    )  # fmt: skip
    assert isinstance(load_config(None, ["optim.lr=1"]).optim.lr, float)  # int -> float field
    assert apply_overrides({"a": {"b": 1}}, ["a.c=null"]) == {"a": {"b": 1, "c": None}}


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["run.batchsize=2"], ValueError, r"unknown config key\(s\) \['run.batchsize'\]"),
        (["run.batch_size=two"], TypeError, "run.batch_size must be int"),
        (["run.batch_size=true"], TypeError, "run.batch_size must be int"),
        (["run.batch_size=0"], ValueError, "run.batch_size must be >= 1"),
        (["run.mode=distil"], ValueError, "run.mode must be one of"),
        (["model.teacher=null"], ValueError, "needs a teacher"),
        (["run.mode=finetune"], ValueError, "set model.student_weights"),
        (["run.mode=teacher_free"], ValueError, "set model.teacher to null"),
        (["data.flip_p=2"], ValueError, "probability"),
        (["data.resolution=100"], ValueError, "multiple of 8"),
        (["oops"], ValueError, "KEY=VALUE"),
    ],
)
def test_bad_values_name_the_key(overrides, error, message):
    with pytest.raises(error, match=message):
        load_config(None, overrides)


def test_config_json_is_plain_json():
    data = json.loads(json.dumps(TrainConfig().to_dict()))
    assert from_dict(TrainConfig, data) == TrainConfig()
    assert set(data) == {"data", "model", "loss", "optim", "run"}
