"""`moebius.models.optimize`: every optimisation matches the plain modules within fp32 rounding."""

import json
import logging
import sys

import numpy as np
import pytest
import torch
from conftest import shared_path, tiny_pipeline
from PIL import Image
from safetensors.torch import load_file

from moebius.cli import main
from moebius.models import MoebiusConfig, MoebiusUNet, PixelHackerConfig, PixelHackerUNet, optimize
from moebius.models.blocks import DepthwiseSeparableConv, Upsample2D
from moebius.models.lambda_layers import CrossLambda, SelfLambda
from moebius.models.optimize import (
    FastCrossLambda,
    FastSelfLambda,
    FastUpsample2D,
    fold_separable_conv,
    resolve_dtype,
)

FP32_TOL = 1e-4  # max abs difference of eps allowed for the fp32 fast path (issue 13)
# The package exports the function `optimize`, which shadows the module's name as an attribute.
OPTIMIZE_MODULE = sys.modules["moebius.models.optimize"]


def _randomize_batchnorms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial running statistics and affine terms, so folding is really exercised."""
    gen = torch.Generator().manual_seed(seed)
    for bn in model.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            c = bn.num_features
            bn.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            bn.weight.data.copy_(1 + 0.2 * torch.randn(c, generator=gen))
            bn.bias.data.copy_(0.1 * torch.randn(c, generator=gen))
    return model.eval()


def _guided_inputs(config: MoebiusConfig, batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    s, half = config.sample_size, config.num_context_tokens
    sample = torch.randn(batch, config.in_channels, s, s, generator=gen)
    ids = torch.tensor([list(range(half, 2 * half)), list(range(half))] * (batch // 2))
    return sample, torch.tensor([900]), ids


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return _randomize_batchnorms(MoebiusUNet(MoebiusConfig.tiny()))


def test_fold_separable_conv_matches():
    torch.manual_seed(0)
    block = _randomize_batchnorms(DepthwiseSeparableConv(16, 16))
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        ref = block(x)
        fold_separable_conv(block)
        out = block(x)
    assert isinstance(block.bn1, torch.nn.Identity) and block.conv_pw.bias is not None
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_self_lambda_matches(channels_last):
    torch.manual_seed(0)
    layer = _randomize_batchnorms(SelfLambda(32, heads=4, dim_k=8, local_size=7))
    x = torch.randn(2, 32, 10, 12)
    fast = FastSelfLambda(layer)
    with torch.no_grad():
        ref = layer(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = fast(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()


@pytest.mark.parametrize("size", [None, (14, 12), (15, 12)])
def test_fast_upsample_matches_nearest_then_conv(size):
    """Sub-pixel 2x2 form of nearest-2x + 3x3 conv; other target sizes take the plain path."""
    torch.manual_seed(0)
    plain = Upsample2D(16).eval()
    fast = FastUpsample2D(plain)
    x = torch.randn(2, 16, 7, 6)
    with torch.no_grad():
        ref = plain(x, size=size)
        out = fast(x.contiguous(memory_format=torch.channels_last), size=size)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", [8, 32])
def test_fast_self_lambda_dtypes_and_sizes(dtype, side):
    torch.manual_seed(0)
    layer = _randomize_batchnorms(SelfLambda(16, heads=2, dim_k=8, local_size=5))
    x = torch.randn(2, 16, side, side)
    fast = FastSelfLambda(layer).to(dtype)
    with torch.no_grad():
        ref = layer(x)
        out = fast(x.to(dtype)).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (1e-6 if dtype == torch.float32 else 2e-2)


def test_fast_cross_lambda_matches_and_caches_per_context():
    torch.manual_seed(0)
    layer = _randomize_batchnorms(CrossLambda(32, 24, heads=4, dim_k=8, grid=6, context_len=5))
    fast = FastCrossLambda(layer)
    x = torch.randn(2, 32, 6, 6)
    contexts = torch.randn(2, 2, 5, 24)
    with torch.no_grad():
        for context in [contexts[0], contexts[0], contexts[1]]:  # miss, hit, miss
            ref, out = layer(x, context), fast(x, context)
            assert (out - ref).abs().max() < 1e-5 * ref.abs().max()
            assert torch.equal(fast._cache[0], context)
        with pytest.raises(ValueError, match="sized for a 6x6 grid"):
            fast(torch.randn(2, 32, 5, 5), contexts[0])


def test_optimize_tiny_matches_plain_and_leaves_original(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    sample, t, ids = _guided_inputs(tiny.config)
    with torch.inference_mode():
        ref, ref_feats = tiny(sample, t, ids, return_features=True)
        fast = optimize(tiny)
        out, feats = fast(sample, t, ids, return_features=True)
        again = tiny(sample, t, ids)
    assert fast is not tiny and fast.optimized_dtype == torch.float32
    assert out.is_contiguous() and out.dtype == torch.float32
    assert (out - ref).abs().max() < FP32_TOL
    for a, b in zip(feats, ref_feats, strict=True):
        assert (a - b).abs().max() < FP32_TOL
    assert torch.equal(again, ref)  # the original still runs the plain modules
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())
    assert any(isinstance(m, SelfLambda) for m in tiny.modules())
    assert not any(isinstance(m, (SelfLambda, CrossLambda)) for m in fast.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())


def test_optimize_bf16_close_to_plain(tiny, monkeypatch):
    monkeypatch.setattr(OPTIMIZE_MODULE, "cpu_has_fast_bf16", lambda: True)
    sample, t, ids = _guided_inputs(tiny.config)
    fast = optimize(tiny, torch.bfloat16)
    assert fast.optimized_dtype == torch.bfloat16
    assert next(fast.parameters()).dtype == torch.bfloat16
    with torch.inference_mode():
        ref = tiny(sample, t, ids)
        out = fast(sample.bfloat16(), t, ids).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 5e-2  # bf16 keeps 8 mantissa bits; the full-size figure is in bench/results


def test_bf16_stays_fp32_without_native_support(monkeypatch, caplog):
    monkeypatch.setattr(OPTIMIZE_MODULE, "cpu_has_fast_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert resolve_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    assert "stays float32" in caplog.text
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="float32, bfloat16 and float16"):
        resolve_dtype(torch.int8, torch.device("cpu"))


def test_optimize_rejects_other_modules():
    with pytest.raises(TypeError, match="MoebiusUNet or PixelHackerUNet"):
        optimize(torch.nn.Linear(2, 2))


def test_optimize_teacher_matches_plain():
    torch.manual_seed(0)
    teacher = PixelHackerUNet(PixelHackerConfig.tiny()).eval()
    s = PixelHackerConfig.tiny().sample_size
    sample = torch.randn(2, 9, s, s)
    ids = torch.arange(10).repeat(2, 1)
    with torch.inference_mode():
        ref = teacher(sample, torch.tensor([500]), ids)
        out = optimize(teacher)(sample, torch.tensor([500]), ids)
    assert (out - ref).abs().max() < FP32_TOL


@pytest.mark.parametrize("name", ["A", "B"])
def test_fast_path_matches_parity_reference(name):
    """The reduced reference student through the fast path against the original's outputs."""
    root = shared_path("reference", "parity")
    config = json.loads((root / "config.json").read_text())["config"]
    model = MoebiusUNet(MoebiusConfig.from_original(config)).eval()
    model.load_state_dict(load_file(str(root / "weights.safetensors")), strict=True)
    inputs = load_file(str(root / f"inputs_{name}.safetensors"))
    outputs = load_file(str(root / f"outputs_{name}.safetensors"))
    with torch.inference_mode():
        eps, feats = optimize(model)(
            inputs["sample"], inputs["timesteps"], inputs["input_ids"], return_features=True
        )
    assert (eps - outputs["noise_pred"]).abs().max() < FP32_TOL
    for i, feat in enumerate(feats):  # stage outputs reach |x| ~ 20: tolerance relative to them
        if f"block_outputs.{i}" in outputs:
            ref = outputs[f"block_outputs.{i}"]
            assert (feat - ref).abs().max() < FP32_TOL * ref.abs().max(), f"block {i}"


def _photo_and_mask(size: int = 128) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = np.zeros((size, size), np.uint8)
    mask[40:90, 30:100] = 255
    return image, Image.fromarray(mask)


def test_pipeline_optimize_same_images_and_refuses_saving(tmp_path):
    plain = tiny_pipeline()
    _randomize_batchnorms(plain.unet)
    image, mask = _photo_and_mask()
    ref = np.asarray(plain(image, mask, steps=3, generator=torch.Generator().manual_seed(3)), int)
    fast = plain.optimize()
    assert fast is plain and plain.unet.optimized_dtype == torch.float32
    out = np.asarray(fast(image, mask, steps=3, generator=torch.Generator().manual_seed(3)), int)
    assert np.abs(out - ref).max() <= 1  # uint8 rounding of a < 1e-4 difference
    with pytest.raises(ValueError, match="save the plain one"):
        fast.save_pretrained(tmp_path / "folded")


def test_cli_fast_matches_plain(tmp_path):
    weights = tiny_pipeline().save_pretrained(tmp_path / "weights")
    image, mask = _photo_and_mask()
    image.save(tmp_path / "a.png")
    mask.save(tmp_path / "m.png")
    common = ["--weights", weights, "--steps", "2", "-q", "--device", "cpu"]
    for name, extra in [("plain", []), ("fast", ["--fast"])]:
        args = ["inpaint", tmp_path / "a.png", tmp_path / "m.png", "-o", tmp_path / f"{name}.png"]
        assert main([str(a) for a in [*args, *common, *extra]]) == 0
    plain, fast = (np.asarray(Image.open(tmp_path / f"{n}.png"), int) for n in ("plain", "fast"))
    assert np.abs(plain - fast).max() <= 1


@pytest.mark.slow
def test_fast_path_full_size_random_weights():
    """Released-size student (random weights, non-trivial BatchNorms): fast fp32 vs plain fp32."""
    torch.manual_seed(0)
    model = _randomize_batchnorms(MoebiusUNet(MoebiusConfig()))
    sample, t, ids = _guided_inputs(model.config)
    with torch.inference_mode():
        ref = model(sample, t, ids)
        out = optimize(model)(sample, t, ids)
    assert (out - ref).abs().max() < FP32_TOL


def test_compiled_fast_path_matches_plain(tiny):
    """optimize(compile=True): inductor's graph of the fast UNet gives the plain outputs, and
    the pipeline's warm_up compiles it before the first real call."""
    sample, t, ids = _guided_inputs(tiny.config)
    fast = optimize(tiny, compile=True)
    assert fast.optimized_compiled and not optimize(tiny).optimized_compiled
    with torch.inference_mode():
        ref = tiny(sample, t, ids)
        out = fast(sample, t, ids)
        again = fast(sample + 1, t, ids)  # the same graph on new values
        ref_again = tiny(sample + 1, t, ids)
    assert (out - ref).abs().max() < FP32_TOL
    assert (again - ref_again).abs().max() < FP32_TOL


@pytest.mark.parametrize("command", ["inpaint", "serve"])
def test_compile_needs_fast(command, tmp_path, capsys):
    args = [command, "--compile", "--weights", str(tmp_path)]
    if command == "inpaint":
        args[1:1] = [str(tmp_path / "a.png"), str(tmp_path / "m.png"), "-o", str(tmp_path / "o")]
    assert main(args) == 2
    assert "add --fast" in capsys.readouterr().err
