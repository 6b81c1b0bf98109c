"""ONNX export of the tiny pipeline: graph parity with torch, no Conv3d, manifest, ORT backend."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from conftest import noise_pair, tiny_pipeline
from PIL import Image

from moebius import cli
from moebius.export import onnx as onnx_export
from moebius.export import runtime
from moebius.pipeline import category_ids


@pytest.fixture(scope="module")
def pipe():
    """The tiny pipeline with non-trivial BatchNorm statistics, as trained weights have."""
    pipe = tiny_pipeline()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        for m in pipe.unet.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return pipe


@pytest.fixture(scope="module")
def weights(pipe, tmp_path_factory):
    """The tiny pipeline saved as a weights folder (unet/ vae/ scheduler/)."""
    return pipe.save_pretrained(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def export_run(weights, tmp_path_factory):
    """`moebius export onnx --check` on the tiny weights, once: (folder, printed lines)."""
    out = tmp_path_factory.mktemp("onnx")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        argv = ["export", "onnx", "--weights", str(weights), "--out", str(out), "--check"]
        assert cli.main(argv) == 0
    return out, printed.getvalue().splitlines()


@pytest.fixture(scope="module")
def exported(export_run):
    return export_run[0]


def test_writes_three_graphs_and_the_manifest(exported):
    names = sorted(p.name for p in exported.iterdir())
    assert names == ["moebius_onnx.json", "unet.onnx", "vae_decoder.onnx", "vae_encoder.onnx"]


def test_export_cli_check_prints_the_parity(export_run):
    out, printed = export_run
    diffs = json.loads(printed[0])["max_abs_diff"]
    assert set(diffs) == {"vae_encoder", "unet", "vae_decoder"}
    assert max(diffs.values()) <= 1e-4 and printed[1] == str(out)


def test_each_graph_matches_torch_in_fp32(pipe, exported):
    # Batch 2 and 3 while the trace used batch 1: the batch axis is really dynamic.
    for batch in (2, 3):
        diffs = onnx_export.parity(exported, pipe.unet, pipe.vae, batch=batch, seed=batch)
        assert set(diffs) == {"vae_encoder", "unet", "vae_decoder"}
        assert all(d <= 1e-4 for d in diffs.values()), diffs


def test_unet_graph_has_no_conv3d(exported):
    import onnx

    model = onnx.load(str(exported / "unet.onnx"))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    ranks = {i.name: len(i.dims) for i in model.graph.initializer}
    # 4-D weights only: the 15x15 position convs are Conv2d over value channels in the batch.
    assert convs and {ranks[n.input[1]] for n in convs} == {4}
    assert any(
        [a.ints for a in n.attribute if a.name == "kernel_shape"] == [[15, 15]] for n in convs
    )
    onnx_export.check_no_conv3d(exported / "unet.onnx")  # the exporter's own check agrees


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_conv3d_check_catches_a_conv3d(tmp_path):
    conv3d = torch.nn.Conv3d(1, 4, (1, 3, 3)).eval()
    path = tmp_path / "c.onnx"
    torch.onnx.export(conv3d, (torch.randn(1, 1, 2, 8, 8),), str(path), dynamo=False)
    with pytest.raises(RuntimeError, match="3-D Conv"):
        onnx_export.check_no_conv3d(path)


def test_manifest_holds_what_a_runtime_needs(pipe, exported):
    data = json.loads((exported / "moebius_onnx.json").read_text())
    assert data["native_size"] == 128 and data["latent_size"] == 16
    assert data["scaling_factor"] == 0.13025 and data["latent_factor"] == 8
    assert data["graphs"]["unet"]["inputs"]["sample"]["shape"] == ["batch", 9, 16, 16]
    assert data["graphs"]["vae_encoder"]["outputs"]["moments"]["shape"] == ["batch", 8, 16, 16]
    alphas = torch.tensor(data["scheduler"]["alphas_cumprod"])
    torch.testing.assert_close(alphas, pipe.scheduler.alphas_cumprod, atol=0, rtol=0)
    assert data["recipe"]["steps"] == 20 and data["recipe"]["guidance_scale"] == 2.5
    cond, negative = category_ids(20, "remove")
    assert data["recipe"]["category_ids"]["remove"] == {"cond": cond, "negative": negative}
    unet, vae = runtime.load_networks(exported)
    assert unet.config == pipe.unet.config
    assert vae.config.scaling_factor == 0.13025
    assert vae.config.block_out_channels == [8, 8, 16, 16]


def test_onnxruntime_pipeline_reproduces_torch_within_one_level(pipe, exported):
    onnx_pipe = runtime.load_pipeline(exported)
    onnx_pipe.set_progress_bar_config(disable=True)
    assert onnx_pipe.native_size == pipe.native_size == 128
    image, mask = noise_pair()
    noise = pipe.draw_noise(1, generator=torch.Generator().manual_seed(3))
    for paste in (True, False):  # pasted, and the raw decoded window
        want = np.asarray(pipe(image, mask, noise=noise, paste=paste, steps=5), dtype=np.int16)
        got = np.asarray(onnx_pipe(image, mask, noise=noise, paste=paste, steps=5), np.int16)
        assert np.abs(got - want).max() <= 1
    assert np.abs(want - np.asarray(image)).max() > 50  # the networks really ran


def test_onnxruntime_unet_matches_torch_with_the_pipelines_timestep_shapes(pipe, exported):
    unet, _ = runtime.load_networks(exported)
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 9, 16, 16, generator=g)
    ids = torch.tensor([list(range(10)), list(range(10, 20))])
    with torch.no_grad():
        want = pipe.unet(sample, torch.tensor([700]), ids)
    for t in (torch.tensor([700]), torch.tensor(700), torch.tensor([700, 700])):
        torch.testing.assert_close(unet(sample, t, ids), want, atol=1e-4, rtol=0)


def test_backend_errors_teach(tmp_path, exported):
    with pytest.raises(FileNotFoundError, match="moebius export onnx"):
        runtime.load_pipeline(tmp_path)
    unet, vae = runtime.load_networks(exported)
    with pytest.raises(ValueError, match="providers="):
        vae.to("cuda")
    with pytest.raises(ValueError, match="--dtype fp16"):
        unet.to(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="dtype must be one of"):
        onnx_export.export(torch.nn.Identity(), torch.nn.Identity(), tmp_path, dtype="int8")


@pytest.mark.slow
def test_fp16_unet_graph_keeps_float32_io(pipe, tmp_path):
    import onnx

    onnx_export.export(pipe.unet, pipe.vae, tmp_path, dtype="fp16")
    model = onnx.load(str(tmp_path / "unet.onnx"))
    weights = [i for i in model.graph.initializer if len(i.dims) == 4]
    assert weights and all(i.data_type == onnx.TensorProto.FLOAT16 for i in weights)
    diffs = onnx_export.parity(tmp_path, pipe.unet, pipe.vae)  # against torch in fp16
    assert diffs["unet"] <= 1e-2 and diffs["vae_decoder"] <= 1e-4, diffs


def test_inpaint_cli_onnxruntime_backend_matches_torch(weights, exported, tmp_path):
    image, mask = noise_pair()
    image.save(tmp_path / "im.png")
    mask.save(tmp_path / "mask.png")
    common = [str(tmp_path / "im.png"), str(tmp_path / "mask.png"), "--steps", "3", "-q"]
    assert cli.main(["inpaint", *common, "-o", str(tmp_path / "torch.png"),
                     "--weights", str(weights)]) == 0  # fmt: skip
    assert cli.main(["inpaint", *common, "-o", str(tmp_path / "ort.png"),
                     "--weights", str(exported), "--backend", "onnxruntime"]) == 0  # fmt: skip
    want = np.asarray(Image.open(tmp_path / "torch.png"), dtype=np.int16)
    got = np.asarray(Image.open(tmp_path / "ort.png"), dtype=np.int16)
    assert want.shape == got.shape == (128, 128, 3) and np.abs(got - want).max() <= 1
    assert np.abs(want - np.asarray(image)).max() > 50  # the hole was filled


def test_inpaint_cli_backend_errors_exit_2(tmp_path, capsys):
    image, mask = noise_pair()
    image.save(tmp_path / "im.png")
    mask.save(tmp_path / "mask.png")
    common = ["inpaint", str(tmp_path / "im.png"), str(tmp_path / "mask.png"), "-o",
              str(tmp_path / "o.png")]  # fmt: skip
    assert cli.main([*common, "--backend", "onnxruntime"]) == 2
    assert "moebius export onnx" in capsys.readouterr().err
    assert cli.main([*common, "--tiny-decoder", str(tmp_path)]) == 2
    assert "--decoder tiny" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
