"""onnxruntime backend: exported graphs standing in for the torch UNet and VAE of the pipeline.

`InpaintPipeline` reaches its networks through a few calls: `unet(sample, timesteps, input_ids)`,
`vae.encode(image).latent_dist`, `vae.decode(z).sample` and their `config`s. `OnnxUNet` and
`OnnxVAE` answer exactly those with onnxruntime sessions on the graphs of `moebius.export.onnx`,
so the recipe (noise, DDIM, guidance, paste-back) stays the pipeline's one implementation.
Tensors go in and come out as float32 CPU torch tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput

from moebius.errors import MissingFileError, UsageError
from moebius.export.onnx import FORMAT_VERSION, GRAPH_FILES, MANIFEST_NAME
from moebius.models import checkpoints

CPU = torch.device("cpu")


def _session(path: Path, providers: list[str] | None, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def _run(session, output: str, **inputs: torch.Tensor) -> torch.Tensor:
    feeds = {k: np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in inputs.items()}
    return torch.from_numpy(session.run([output], feeds)[0])


class _Backend:
    """What the pipeline asks of any network: eval(), to(), device, dtype."""

    device, dtype = CPU, torch.float32

    def eval(self):
        return self

    def to(self, device=None, dtype=None):
        """Inputs and outputs stay float32 on CPU; the graphs' own dtype was fixed at export."""
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(
                f"the onnxruntime backend hands CPU tensors in and out, not {device}; choose "
                "the execution provider with providers= (e.g. CUDAExecutionProvider) instead"
            )
        if dtype is not None and dtype != torch.float32:
            raise ValueError(
                f"the onnxruntime backend runs the graphs' exported dtype, not {dtype}; "
                "export with --dtype fp16 for a float16 UNet"
            )
        return self

    def parameters(self):
        """One empty float32 CPU tensor, so code reading the device/dtype of a model works."""
        yield torch.empty(0)


class OnnxUNet(_Backend):
    """`unet(sample [B,9,n,n], timesteps [] | [1] | [B], input_ids [B,10]) -> eps [B,4,n,n]`."""

    def __init__(self, session, config):
        self.session, self.config = session, config

    def __call__(self, sample: torch.Tensor, timesteps, input_ids: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timesteps).reshape(-1).to(torch.int64)
        if t.numel() not in (1, sample.shape[0]):
            raise ValueError(
                f"timesteps must have 1 or B={sample.shape[0]} values, got {t.numel()}"
            )
        t = t.expand(sample.shape[0])
        return _run(self.session, "eps", sample=sample.float(), timestep=t,
                    input_ids=input_ids.to(torch.int64))  # fmt: skip


class OnnxVAE(_Backend):
    """`encode(image).latent_dist` (diffusers' posterior), `decode(z).sample`: as AutoencoderKL."""

    def __init__(self, encoder, decoder, config: dict):
        self.encoder, self.decoder, self.config = encoder, decoder, FrozenDict(config)

    def encode(self, image: torch.Tensor) -> AutoencoderKLOutput:
        moments = _run(self.encoder, "moments", image=image.float())
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(moments))

    def decode(self, z: torch.Tensor) -> DecoderOutput:
        return DecoderOutput(sample=_run(self.decoder, "image", z=z.float()))


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of an export folder, with a clear error if it is not one."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise MissingFileError(
            f"{directory} is not an ONNX export: {MANIFEST_NAME} is missing. Write one with "
            "`moebius export onnx --weights DIR --out OUT_DIR`"
        )
    data = json.loads(path.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise UsageError(
            f"{path} has format_version {data.get('format_version')}, this version reads "
            f"{FORMAT_VERSION}; export again with this version"
        )
    missing = [f for f in GRAPH_FILES.values() if not (Path(directory) / f).is_file()]
    if missing:
        raise MissingFileError(f"{directory} lacks {missing}; export again")
    return data


def load_networks(
    directory: str | os.PathLike,
    providers: list[str] | None = None,
    threads: int | None = None,
) -> tuple[OnnxUNet, OnnxVAE]:
    """(unet, vae) stand-ins on the graphs of an export folder."""
    directory = Path(directory)
    data = read_manifest(directory)
    sessions = {k: _session(directory / f, providers, threads) for k, f in GRAPH_FILES.items()}
    unet = OnnxUNet(sessions["unet"], checkpoints.config_from_dict(data["unet_config"]))
    vae = OnnxVAE(sessions["vae_encoder"], sessions["vae_decoder"], data["vae_config"])
    return unet, vae


def load_pipeline(
    directory: str | os.PathLike,
    providers: list[str] | None = None,
    threads: int | None = None,
):
    """An `InpaintPipeline` whose networks run on onnxruntime (scheduler from the manifest)."""
    from diffusers import DDIMScheduler

    from moebius.pipeline import InpaintPipeline

    unet, vae = load_networks(directory, providers, threads)
    config = read_manifest(directory)["scheduler"]
    scheduler = DDIMScheduler.from_config({k: v for k, v in config.items()
                                           if k != "alphas_cumprod"})  # fmt: skip
    return InpaintPipeline(unet, vae, scheduler)
