"""ONNX export of the pipeline's three networks, plus the manifest a browser or phone runtime needs.

Graphs (batch axis dynamic, spatial size fixed at the native size N = 8 n; released N = 512):

    vae_encoder.onnx  image [B,3,N,N] in [-1,1]                    -> moments [B,2c,n,n]
    unet.onnx         sample [B,9,n,n], timestep [B] int64,
                      input_ids [B,10] int64                         -> eps [B,4,n,n]
    vae_decoder.onnx  z [B,c,n,n] = latents / scaling_factor         -> image [B,3,N,N] ~ [-1,1]

`moments` is diffusers' posterior parameters: mean = moments[:, :c], logvar = moments[:, c:]
clamped to [-30, 20], and the pipeline's latents are (mean + exp(logvar / 2) * eps) *
scaling_factor. Graph inputs and outputs are float32 whatever the weights' dtype (`--dtype fp16`
casts inside the UNet graph), so one runtime serves both. The VAE stays float32: its decoder is
unstable in fp16 (shared/spec/ecosystem.md, the browser port's lesson). The local position lambda
is a Conv2d over the value channels folded into the batch (`PositionConv`), so the graph has no
Conv3d node, which Safari's WebGPU cannot compile.

Exporter: torch.onnx's TorchScript tracer (`dynamo=False`), opset 18. The dynamo exporter gives
the same numbers but took 60-100 s for the tiny test model on 2 CPU cores against 7 s here.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from moebius import vae as vae_lib
from moebius.models import checkpoints
from moebius.recipe import NOISE_KEYS, TASKS, Recipe, category_ids, make_scheduler

logger = logging.getLogger(__name__)

OPSET = 18
MANIFEST_NAME = "moebius_onnx.json"
GRAPH_FILES = {
    "vae_encoder": "vae_encoder.onnx",
    "unet": "unet.onnx",
    "vae_decoder": "vae_decoder.onnx",
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- the three graphs
class UNetGraph(nn.Module):
    """eps = unet(sample, timestep, input_ids) with float32 I/O around weights of any dtype."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, input_ids):
        dtype = next(self.unet.parameters()).dtype
        return self.unet(sample.to(dtype), timestep, input_ids).float()


class VaeEncoderGraph(nn.Module):
    """image [B,3,N,N] in [-1,1] -> posterior moments [B,2c,n,n] (mean | logvar)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        return self.vae.encode(image).latent_dist.parameters


class VaeDecoderGraph(nn.Module):
    """Unscaled latents z [B,c,n,n] -> image [B,3,N,N] in about [-1,1] (not clamped)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample


def example_inputs(unet: nn.Module, vae: nn.Module, batch: int = 2, generator=None) -> dict:
    """Random float32 inputs of every graph: {graph: {input name: tensor}}."""
    cfg = unet.config
    n, c = cfg.sample_size, vae.config.latent_channels
    big = n * vae_lib.latent_factor(vae)
    ids_shape = (batch, cfg.num_context_tokens)
    return {
        "vae_encoder": {"image": torch.rand(batch, 3, big, big, generator=generator) * 2 - 1},
        "unet": {
            "sample": torch.randn(batch, cfg.in_channels, n, n, generator=generator),
            "timestep": torch.randint(0, 1000, (batch,), generator=generator),
            "input_ids": torch.randint(0, cfg.num_embeddings, ids_shape, generator=generator),
        },
        "vae_decoder": {"z": torch.randn(batch, c, n, n, generator=generator)},
    }


OUTPUT_NAMES = {"vae_encoder": "moments", "unet": "eps", "vae_decoder": "image"}


def graph_modules(unet: nn.Module, vae: nn.Module) -> dict[str, nn.Module]:
    """The torch modules that are exported, by graph name (eval mode)."""
    return {
        "vae_encoder": VaeEncoderGraph(vae).eval(),
        "unet": UNetGraph(unet).eval(),
        "vae_decoder": VaeDecoderGraph(vae).eval(),
    }


def _export_graph(module: nn.Module, inputs: dict, output: str, path: Path) -> None:
    # The tracer runs `module` once; eval() on the wrapper matters: the tracer exports the
    # training mode of the module it is given (BatchNorm with batch statistics otherwise).
    assert not module.training
    axes = {name: {0: "batch"} for name in (*inputs, output)}
    with warnings.catch_warnings(), torch.no_grad():
        # Shape checks in forward() become constants of the fixed-size graph: expected.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the tracer exporter is "legacy"
        warnings.filterwarnings("ignore", "Constant folding", UserWarning)  # strided slices
        torch.onnx.export(
            module, tuple(inputs.values()), str(path), dynamo=False, opset_version=OPSET,
            input_names=list(inputs), output_names=[output], dynamic_axes=axes,
        )  # fmt: skip


# --------------------------------------------------------------------------------- export
def export(
    unet: nn.Module,
    vae: nn.Module,
    out_dir: str | Path,
    *,
    dtype: str = "fp32",
    scheduler=None,
) -> Path:
    """Write the three graphs and the manifest under `out_dir`; returns the manifest's path.

    `dtype` "fp16" stores the UNet's weights in float16 (half the size, for WebGPU / CoreML);
    the VAE graphs stay float32. The modules are not changed (a copy is cast).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unet, vae = unet.eval(), vae.eval()
    if dtype != "fp32":
        import copy

        unet = copy.deepcopy(unet).to(DTYPES[dtype])
    inputs = example_inputs(unet, vae, batch=1, generator=torch.Generator().manual_seed(0))
    for name, module in graph_modules(unet, vae).items():
        logger.info("exporting %s", GRAPH_FILES[name])
        _export_graph(module, inputs[name], OUTPUT_NAMES[name], out_dir / GRAPH_FILES[name])
        if name == "unet":
            check_no_conv3d(out_dir / GRAPH_FILES[name])
    path = out_dir / MANIFEST_NAME
    data = manifest(unet, vae, scheduler or make_scheduler(), unet_dtype=dtype)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def manifest(unet: nn.Module, vae: nn.Module, scheduler, unet_dtype: str = "fp32") -> dict:
    """Everything a runtime needs besides the graphs: shapes, VAE scaling, recipe, schedule."""
    n, factor = unet.config.sample_size, vae_lib.latent_factor(vae)
    c = vae.config.latent_channels
    batch = "batch"
    recipe = Recipe()
    return {
        "format": "moebius-onnx",
        "format_version": FORMAT_VERSION,
        "opset": OPSET,
        "torch_version": torch.__version__,
        "native_size": n * factor,
        "latent_size": n,
        "latent_factor": factor,
        "latent_channels": c,
        "scaling_factor": vae.config.scaling_factor,
        "graphs": {
            "vae_encoder": _graph_entry(
                "vae_encoder",
                "fp32",
                {
                    "image": [[batch, 3, n * factor, n * factor], "float32", "RGB in [-1, 1]"],
                },
                [[batch, 2 * c, n, n], "float32", "posterior mean | logvar"],
            ),
            "unet": _graph_entry(
                "unet",
                unet_dtype,
                {
                    "sample": [
                        [batch, unet.config.in_channels, n, n],
                        "float32",
                        "noisy latent x_t (4) | hole mask (1) | masked-image latent (4)",
                    ],
                    "timestep": [[batch], "int64", "DDIM timestep per sample"],
                    "input_ids": [[batch, unet.config.num_context_tokens], "int64", "category ids"],
                },
                [[batch, c, n, n], "float32", "noise prediction eps"],
            ),
            "vae_decoder": _graph_entry(
                "vae_decoder",
                "fp32",
                {
                    "z": [[batch, c, n, n], "float32", "latents / scaling_factor"],
                },
                [[batch, 3, n * factor, n * factor], "float32", "RGB in about [-1, 1]"],
            ),
        },  # fmt: skip
        "formulas": {
            "posterior": "mean, logvar = split(moments, 2, axis=1); logvar = clip(logvar, -30, "
            "20); latents = (mean + exp(logvar / 2) * eps) * scaling_factor",
            "masked_image": "image * (1 - fill_mask): holes become 0 (mid grey)",
            "latent_mask": "fill mask (1 = fill) sampled at pixel (latent_factor * i, "
            "latent_factor * j): nearest resize, no pooling",
            "guidance": "eps = eps[negative] + guidance_scale * (eps[cond] - eps[negative]); "
            "the UNet batch is [negative ids x B; cond ids x B]",
            "initial_noise": "noise = randn + noise_offset * randn[B, c, 1, 1]; x = "
            "sqrt(alphas_cumprod[t0]) * latents + sqrt(1 - alphas_cumprod[t0]) * noise",
            "decode": "image01 = (vae_decoder(latents / scaling_factor) + 1) / 2",
        },
        "noise_keys": list(NOISE_KEYS),
        "recipe": {
            "steps": recipe.steps,
            "strength": recipe.strength,
            "guidance_scale": recipe.guidance_scale,
            "noise_offset": recipe.noise_offset,
            "paste": recipe.paste,
            "task": recipe.task,
            "category_ids": {
                task: dict(
                    zip(
                        ("cond", "negative"),
                        category_ids(unet.config.num_embeddings, task),
                        strict=True,
                    )
                )
                for task in TASKS
            },  # fmt: skip
        },
        "scheduler": {
            **{k: v for k, v in scheduler.config.items() if not k.startswith("_")},
            "alphas_cumprod": [float(a) for a in scheduler.alphas_cumprod],
        },
        "unet_config": checkpoints.config_to_dict(unet.config),
        "vae_config": {k: v for k, v in vae.config.items() if not k.startswith("_")},
    }


def _graph_entry(name: str, dtype: str, inputs: dict, output: list) -> dict:
    return {
        "file": GRAPH_FILES[name],
        "weights_dtype": dtype,
        "inputs": {k: dict(zip(("shape", "dtype", "meaning"), v, strict=True))
                   for k, v in inputs.items()},
        "outputs": {OUTPUT_NAMES[name]: dict(zip(("shape", "dtype", "meaning"), output,
                                                 strict=True))},
    }  # fmt: skip


# ------------------------------------------------------------------------------- checks
def op_types(path: str | Path) -> set[str]:
    """The set of ONNX operator types in a graph file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {node.op_type for node in model.graph.node}


def check_no_conv3d(path: str | Path) -> None:
    """Raise if the graph holds a 3-D convolution, which Safari's WebGPU cannot compile."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ranks = {init.name: len(init.dims) for init in model.graph.initializer}
    for node in model.graph.node:
        kernel = [list(a.ints) for a in node.attribute if a.name == "kernel_shape"]
        if node.op_type == "Conv" and (ranks.get(node.input[1]) == 5 or len(kernel[0]) == 3):
            raise RuntimeError(f"{path}: node {node.name} is a 3-D Conv (Conv3d was exported)")


def parity(
    out_dir: str | Path, unet: nn.Module, vae: nn.Module, batch: int = 2, seed: int = 0
) -> dict[str, float]:
    """Max |onnxruntime - torch| of each graph on random inputs (batch != the traced batch 1)."""
    import onnxruntime as ort

    out_dir = Path(out_dir)
    data = json.loads((out_dir / MANIFEST_NAME).read_text())
    inputs = example_inputs(unet, vae, batch, generator=torch.Generator().manual_seed(seed))
    if data["graphs"]["unet"]["weights_dtype"] != "fp32":
        import copy

        unet = copy.deepcopy(unet).to(DTYPES[data["graphs"]["unet"]["weights_dtype"]])
    diffs = {}
    for name, module in graph_modules(unet, vae).items():
        session = ort.InferenceSession(
            str(out_dir / GRAPH_FILES[name]), providers=["CPUExecutionProvider"]
        )
        got = session.run(None, {k: v.numpy() for k, v in inputs[name].items()})[0]
        with torch.no_grad():
            want = module(*inputs[name].values()).numpy()
        diffs[name] = float(np.abs(got - want).max())
    return diffs
