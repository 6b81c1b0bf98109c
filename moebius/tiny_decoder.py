"""Fast preview decoder: TAESDXL, a tiny autoencoder that reads the SDXL latent space.

The Moebius VAE is SDXL's AutoencoderKL, so madebyollin's TAESDXL decodes our latents: diffusers'
`AutoencoderTiny` in the layout of the hub repo "madebyollin/taesdxl" (`config.json` +
`diffusion_pytorch_model.safetensors`). It takes the latents of the UNet's space directly (its
own scaling_factor is 1; the SDXL VAE's 0.13025 is already in them) and costs a few percent of
the full decoder, so it serves `--decoder tiny` and live previews of the x0 estimate while
denoising (`Previewer`, a step callback of the pipeline).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from moebius.errors import MissingFileError, UsageError
from moebius.models.optimize import cpu_has_fast_bf16

logger = logging.getLogger(__name__)

TAESDXL_REPO = "madebyollin/taesdxl"
TAESDXL_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def fast_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on CUDA and on CPUs with native bf16 (AVX-512 BF16 or AMX), else float32.

    Measured (bench/tiny_decoder.py, 512 px, AMX CPU): bf16 decodes ~2.4x faster than fp32;
    on AVX2-only CPUs bf16 is emulated and slower, so those keep fp32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32


def load_tiny_decoder(
    source: str | os.PathLike = TAESDXL_REPO,
    *,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
):
    """`AutoencoderTiny` from a folder or a hub repo in the TAESDXL layout; eval mode.

    `dtype` None picks `fast_dtype(device)`: a preview decoder trades the last bit of precision
    for speed where the hardware computes bfloat16 natively.
    """
    from diffusers import AutoencoderTiny

    path = Path(source)
    if path.exists() or str(source).startswith((".", "/")):
        missing = [f for f in TAESDXL_FILES if not (path / f).is_file()]
        if missing:
            raise MissingFileError(
                f"{path} is not a tiny-decoder folder: missing {missing}. It holds the files of "
                f"the hub repo {TAESDXL_REPO} (config.json + diffusion_pytorch_model.safetensors)"
            )
    else:
        from huggingface_hub import snapshot_download

        try:
            path = Path(
                snapshot_download(
                    str(source),
                    allow_patterns=list(TAESDXL_FILES),
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                )
            )
        except OSError as err:  # offline and not cached, or no such repo
            raise MissingFileError(
                f"cannot get the tiny decoder {source} ({type(err).__name__}): it is not in the "
                f"Hugging Face cache and the hub did not answer. Put {' + '.join(TAESDXL_FILES)} "
                f"of the hub repo {TAESDXL_REPO} in a folder and pass that folder instead"
            ) from err
    config = AutoencoderTiny.load_config(path)
    if config.get("latent_channels") != 4:
        raise UsageError(
            f"{source} decodes {config.get('latent_channels')}-channel latents; the SDXL latent "
            f"space has 4 (use {TAESDXL_REPO})"
        )
    dtype = dtype or fast_dtype(device)
    tiny = AutoencoderTiny.from_pretrained(path, low_cpu_mem_usage=False, torch_dtype=dtype)
    # 64-channel convs at up to full resolution: channels-last runs them ~1.6x faster on CPU.
    return tiny.to(device=device, memory_format=torch.channels_last).eval()


def decode(tiny, latents: torch.Tensor) -> torch.Tensor:
    """Pipeline latents [B,4,h,w] (VAE-scaled) -> image [B,3,8h,8w] float32 in about [-1,1].

    Same contract as `moebius.vae.decode` (the full decoder), so either can finish a run.
    """
    z = latents.to(device=tiny.device, dtype=tiny.dtype) / tiny.config.scaling_factor
    z = z.contiguous(memory_format=torch.channels_last)
    return tiny.decode(z).sample.float()


# ------------------------------------------------------------------------------- x0 previews
def x0_from_consecutive(
    x_t: torch.Tensor, x_prev: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float
) -> torch.Tensor:
    """The x0 estimate of a deterministic DDIM step (eta = 0) from its input and output latents.

    DDIM writes both latents on one line through (x0, eps):
        x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps,  x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps
    (Song et al. 2021, eq. 12 with sigma = 0); eliminating eps gives the step's own prediction
        x0 = (n_p x_t - n_t x_prev) / (n_p s_t - n_t s_prev),  s = sqrt(ab), n = sqrt(1 - ab),
    so a step callback that sees only x_prev recovers what the scheduler predicted.
    """
    s_t, n_t = alpha_bar_t**0.5, (1 - alpha_bar_t) ** 0.5
    s_p, n_p = alpha_bar_prev**0.5, (1 - alpha_bar_prev) ** 0.5
    return (n_p * x_t - n_t * x_prev) / (n_p * s_t - n_t * s_p)


class Previewer:
    """Step callback `(i, t, x)` that decodes the x0 estimate: `on_preview(i, image [B,3,H,W])`.

    Images are float32 in [0, 1]. A step's x0 needs its input latents, which the callback saw
    one step earlier, so previews start at the second step (index 1); `every` thins them out.
    The last step lands on x0 itself (DDIM's final alpha_bar is 1). Works with the pipeline's
    DDIM scheduler (eta = 0); state resets whenever a new run starts at step 0.
    """

    def __init__(
        self,
        tiny,
        scheduler,
        on_preview: Callable[[int, torch.Tensor], None],
        every: int = 1,
    ):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.tiny, self.scheduler, self.on_preview, self.every = tiny, scheduler, on_preview, every
        self._last: tuple[int, torch.Tensor] | None = None

    def alpha_bar(self, t: int) -> float:
        """alphas_cumprod[t], or the scheduler's final value past the start of the schedule."""
        if t < 0:
            return float(self.scheduler.final_alpha_cumprod)
        return float(self.scheduler.alphas_cumprod[t])

    @torch.no_grad()
    def __call__(self, i: int, t: torch.Tensor, x: torch.Tensor) -> None:
        t = int(t)
        last, self._last = (None if i == 0 else self._last), (t, x)
        if last is None or i % self.every:
            return
        t_last, x_t = last  # x_t: this step's input, at timestep t (the previous step's output)
        t_prev = t - (t_last - t)  # the step goes from t to t - (spacing of the schedule)
        x0 = x0_from_consecutive(x_t.float(), x.float(), self.alpha_bar(t), self.alpha_bar(t_prev))
        self.on_preview(i, (decode(self.tiny, x0) + 1) / 2)
