"""Checkpoint I/O: released .bin layout, our safetensors folders, and refusal of unsafe files."""

import json

import pytest
import torch
from safetensors import safe_open

from moebius.models import MoebiusConfig, MoebiusUNet
from moebius.models.checkpoints import (
    CheckpointError,
    convert_original,
    load_config,
    load_into,
    load_pretrained,
    load_state_dict_file,
    save_original,
    save_pretrained,
)


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and BatchNorm statistic non-trivial values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=gen) * 0.1
                tensor.copy_(noise.abs() + 0.5 if "running_var" in name else tensor + noise)
    return model.eval()


@pytest.fixture(scope="module")
def model_and_input():
    torch.manual_seed(0)
    model = _randomised(MoebiusUNet(MoebiusConfig.tiny()))
    x = torch.randn(2, 9, 16, 16)
    ids = torch.tensor([list(range(10, 20)), list(range(10))])
    with torch.no_grad():
        ref = model(x, torch.tensor([900]), ids)
    return model, (x, torch.tensor([900]), ids), ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_original_bin_round_trip(tmp_path, model_and_input, dtype):
    model, inputs, ref = model_and_input
    save_original(model, tmp_path / "diffusion_pytorch_model.bin", dtype=dtype)
    state = load_state_dict_file(tmp_path / "diffusion_pytorch_model.bin")
    assert state["diff_model.conv_in.conv_pw.weight"].dtype == dtype
    assert state["diff_model.conv_in.bn1.num_batches_tracked"].dtype == torch.int64

    loaded = load_into(MoebiusUNet(model.config), tmp_path / "diffusion_pytorch_model.bin").eval()
    assert next(loaded.parameters()).dtype == torch.float32
    save_pretrained(loaded, tmp_path / "ours")
    again = load_pretrained(tmp_path / "ours")
    assert not again.training
    assert load_config(tmp_path / "ours") == model.config
    with torch.no_grad():
        out_loaded, out_again = loaded(*inputs), again(*inputs)
    assert torch.equal(out_loaded, out_again)
    if dtype == torch.float32:
        assert torch.equal(out_loaded, ref)
    else:  # bf16 storage rounds the weights: close, not equal
        assert 0 < (out_loaded - ref).abs().max() < 0.2 * ref.abs().max()


def test_safetensors_metadata_holds_config(tmp_path, model_and_input):
    model, _, _ = model_and_input
    save_pretrained(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["config"])
    assert meta == json.loads((tmp_path / "config.json").read_text())
    assert meta["model_type"] == "moebius" and meta["block_out_channels"] == [16, 32, 64]


def test_convert_original(tmp_path, model_and_input):
    model, inputs, ref = model_and_input
    save_original(model, tmp_path / "w.bin")
    convert_original(tmp_path / "w.bin", model.config, tmp_path / "converted")
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "converted")(*inputs), ref)


class _NotATensor:
    pass


def test_pickled_object_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(2), "extra": _NotATensor()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="not a plain tensor state dict"):
        load_state_dict_file(tmp_path / "evil.bin")


def test_non_dict_is_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.bin")
    with pytest.raises(CheckpointError, match="not a dict of name -> tensor"):
        load_state_dict_file(tmp_path / "list.bin")


def test_mismatched_weights_explain_what_differs(tmp_path, model_and_input):
    model, _, _ = model_and_input
    save_original(model, tmp_path / "tiny.bin")
    other = MoebiusUNet(model.config.replace(cross_attention_dim=48))
    with pytest.raises(
        CheckpointError,
        match=r"32 of another shape .*encoder_hid_proj.weight: file \[32, 32\], model \[48, 32\]",
    ):
        load_into(other, tmp_path / "tiny.bin")


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_state_dict_file(tmp_path / "absent.bin")
