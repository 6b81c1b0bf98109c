"""InpaintPipeline: normalise -> plan windows -> encode -> denoise -> decode -> composite.

The network (student or teacher) only maps tensors to tensors; this file is the one place that
knows the VAE, the DDIM scheduler and classifier-free guidance. `__call__` takes images of any
size and mode: each image and mask is normalised once (`images.to_rgb`, `masks.prepare_mask`),
`strategies.plan` lists the native-size windows that cover the mask, the windows of all images
go through the tensor core `inpaint_tensors` in batches, and `composite.merge` pastes each
result back at the input's resolution. `inpaint_tensors` is the original recipe on a native-size
batch (shared/spec/pipeline.md, section 4), built from `encode`, `denoise` and `decode`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from PIL import Image
from tqdm.auto import tqdm

from moebius import composite, hub, images, masks, options, strategies, tiny_decoder
from moebius import vae as vae_lib
from moebius.models.optimize import optimize as optimize_model
from moebius.options import DEFAULT_MODEL, TASKS  # noqa: F401 (TASKS: public name)
from moebius.pretrained import load_components, save_components
from moebius.recipe import (  # noqa: F401 (public names of the API)
    NOISE_KEYS,
    NOISE_OFFSET,
    Recipe,
    category_ids,
    draw_noise,
    make_scheduler,
    schedule,
)

logger = logging.getLogger(__name__)

# callback(step index, timestep, latents after the step), e.g. for progress or to record a trace.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


class InpaintPipeline:
    """Moebius inpainting: `pipe(image, mask) -> image`; `unet`, `vae`, `scheduler` are public."""

    def __init__(
        self, unet: torch.nn.Module, vae, scheduler: DDIMScheduler | None = None, decoder=None
    ):
        self.unet = unet.eval()
        self.vae = vae.eval()
        self.scheduler = scheduler or make_scheduler()
        # Optional fast decoder used instead of the VAE's (moebius.tiny_decoder: TAESDXL).
        self.decoder = decoder.eval() if decoder is not None else None
        self.progress_bar_config: dict = {}

    # ----------------------------------------------------------------------------- loading, devices
    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike | None = None,
        *,
        variant: str = hub.DEFAULT_VARIANT,
        model: str | None = None,
        config=None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
    ) -> InpaintPipeline:
        """Load from the hub ("hustvl/Moebius" + variant, cached) or a folder; CPU, fp32, eval.

        `pretrained` is a hub repo id (default: that of `model`) or a folder written by
        `save_pretrained` / laid out like the release. `model` is "moebius" (default) or
        "pixelhacker" (the teacher). `config` gives the architecture of a released .bin that has no
        config.json beside it (default: the released architecture of `model`).
        """
        files = hub.resolve(pretrained, variant, model=model or DEFAULT_MODEL, cache_dir=cache_dir,
                            local_files_only=local_files_only, revision=revision)  # fmt: skip
        return cls.from_files(files, model=model, config=config)

    @classmethod
    def from_files(cls, files: hub.WeightFiles, *, model=None, config=None) -> InpaintPipeline:
        """Build the pipeline from resolved weight files (see `moebius.hub.resolve`)."""
        return cls(*load_components(files, model=model, config=config))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write unet/ (config.json + model.safetensors), vae/ and scheduler/ under `directory`."""
        if getattr(self.unet, "optimized_dtype", None) is not None:
            raise ValueError("an optimize()d pipeline holds folded weights: save the plain one")
        return save_components(self.unet, self.vae, self.scheduler, directory)

    def to(self, device: str | torch.device | None = None, dtype=None) -> InpaintPipeline:
        """Move the networks to `device` / cast them to `dtype` (DDIM math stays float32)."""
        for module in (self.unet, self.vae, *([self.decoder] if self.decoder else [])):
            module.to(device=device)
            if dtype is not None and dtype != next(module.parameters()).dtype:
                module.to(dtype=dtype)
        return self

    def optimize(
        self, dtype: torch.dtype | None = None, *, compile: bool = False
    ) -> InpaintPipeline:
        """Swap in the fast UNet (`moebius.models.optimize`): same outputs in float32, or
        bfloat16 / float16 where the device runs it natively. The VAE keeps its dtype (bf16
        decoding moves pixels by up to ~10 levels) and gets channels-last convs (same values).
        `compile=True` also compiles the UNet (torch.compile) on its first call: see `warm_up`."""
        self.unet = optimize_model(self.unet, dtype, compile=compile)
        self.vae.to(memory_format=torch.channels_last)
        return self

    def warm_up(self) -> InpaintPipeline:
        """Run one small native-size inpaint, so a compiled UNet compiles now, not on the first
        request (a single image: other batch sizes compile once more when first seen)."""
        side = self.native_size
        image, mask = Image.new("RGB", (side, side), (128, 128, 128)), Image.new("L", (side, side))
        mask.paste(255, (side // 4, side // 4, side // 2, side // 2))
        self(image, mask, steps=3, strategy="native", generator=torch.Generator().manual_seed(0))
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def native_size(self) -> int:
        """Image side the network runs at: latent sample_size x the VAE factor (512 released)."""
        return self.unet.config.sample_size * vae_lib.latent_factor(self.vae)

    def set_progress_bar_config(self, **kwargs) -> None:
        """Options for the per-step tqdm bar, e.g. `disable=True`."""
        self.progress_bar_config = kwargs

    # ------------------------------------------------------------------------ any size, any mode
    @torch.inference_mode()
    def __call__(
        self,
        image: Image.Image | Sequence[Image.Image],
        mask: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray],
        *,
        steps: int = Recipe.steps,
        strength: float = Recipe.strength,
        guidance_scale: float = Recipe.guidance_scale,
        noise_offset: float = Recipe.noise_offset,
        strategy: str = "auto",
        margin: int = strategies.DEFAULT_MARGIN,
        mask_dilation: int = 0,
        invert_mask: bool = False,
        resize_mask: bool = False,
        paste: bool = Recipe.paste,
        compensate: bool = Recipe.compensate,
        task: str = Recipe.task,
        batch_size: int = 4,
        generator: torch.Generator | None = None,
        noise: dict[str, torch.Tensor] | None = None,
        callback: StepCallback | None = None,
    ) -> Image.Image | list[Image.Image]:
        """Fill the white (255) part of `mask` in `image`; image(s) of the input's size and mode.

        Any size: `strategy` "crop" (default above native size) runs a native window around each
        mask region, "resize" fits the whole image to native, "native" needs native-size inputs.
        The windows of all images share batches of `batch_size`. `paste=False` returns the raw
        generated pixels inside each window (at every size; pixels outside all windows are the
        input's). `task` "remove" fills with background, "object" generates an object. `noise`
        (the four draws of one batch holding every window of the call, NOISE_KEYS) replaces
        drawing from `generator`, for exact reproduction of the original.
        """
        single = isinstance(image, Image.Image)
        image_list = [image] if single else list(image)
        mask_list = [mask] if single else list(mask)
        if len(image_list) != len(mask_list):
            raise ValueError(
                f"got {len(image_list)} images but {len(mask_list)} masks; pass one mask per image"
            )
        options.validate(steps=steps, strength=strength, guidance_scale=guidance_scale,
                         noise_offset=noise_offset, strategy=strategy, margin=margin,
                         mask_dilation=mask_dilation, task=task, batch_size=batch_size)  # fmt: skip
        recipe = Recipe(steps, strength, guidance_scale, noise_offset, paste, compensate, task)
        # Normalised once: the fill (the only threshold) and RGB, the latter only where work is.
        fills = [masks.prepare_mask(m, im.size, invert=invert_mask, dilation=mask_dilation,
                                    resize=resize_mask)
                 for im, m in zip(image_list, mask_list, strict=True)]  # fmt: skip
        plans = [strategies.plan(fill, self.native_size, strategy, margin) for fill in fills]
        rgbs = [images.to_rgb(im) if plan else None
                for im, plan in zip(image_list, plans, strict=True)]  # fmt: skip
        windows = [(i, w) for i, plan in enumerate(plans) for w in plan]  # of every image
        step = batch_size if noise is None else max(len(windows), 1)  # given draws: one batch
        canvases = [rgb[0] if rgb else None for rgb in rgbs]
        self._fill_windows(windows, canvases, fills, recipe, step,
                           generator=generator, noise=noise, callback=callback)  # fmt: skip
        outputs = [im.copy() if rgb is None else images.restore(*rgb)
                   for im, rgb in zip(image_list, rgbs, strict=True)]  # fmt: skip
        return outputs[0] if single else outputs

    def _fill_windows(self, windows, canvases, fills, recipe, batch_size, **core_kwargs):
        """Run (image index, window) pairs in batches; merge each result into its canvas."""
        n = self.native_size
        # Every input is cut before any result is merged, so overlapping windows see the input.
        inputs = [composite.window_input(canvases[i], fills[i], w, n) for i, w in windows]
        for start in range(0, len(windows), batch_size):
            batch = slice(start, start + batch_size)
            results = self.inpaint_arrays(inputs[batch], recipe, **core_kwargs)
            for (i, window), result in zip(windows[batch], results, strict=True):
                composite.merge(canvases[i], fills[i], window, result, n, paste=recipe.paste,
                                compensate=recipe.compensate)  # fmt: skip

    def inpaint_arrays(self, inputs: Sequence, recipe: Recipe = Recipe(), **kwargs) -> np.ndarray:
        """(RGB uint8 [N,N,3], bool fill [N,N]) pairs -> raw results uint8 [B,N,N,3] (truncated)."""
        image = images.to_tensor(np.stack([pixels for pixels, _ in inputs]))
        fill = torch.from_numpy(np.stack([hole for _, hole in inputs]).astype(np.uint8))[:, None]
        decoded = self.inpaint_tensors(image, fill, recipe, **kwargs)
        return images.tensor_to_uint8((decoded + 1) / 2)  # the original's (x + 1) / 2, clamp

    # ----------------------------------------------------------------------------- tensor core
    @torch.inference_mode()
    def inpaint_tensors(self, image: torch.Tensor, fill: torch.Tensor, recipe: Recipe = Recipe(),
                        *, generator: torch.Generator | None = None, noise: dict | None = None,
                        callback: StepCallback | None = None) -> torch.Tensor:  # fmt: skip
        """The recipe on a native batch: image [B,3,N,N] in [-1,1], fill [B,1,N,N] (1 = fill)
        -> decoded [B,3,N,N] float32 in about [-1,1] (not clamped, nothing pasted)."""
        n = self.native_size
        batch = image.shape[0]
        if image.shape != (batch, 3, n, n) or fill.shape != (batch, 1, n, n):
            raise ValueError(f"inpaint_tensors takes image [B, 3, {n}, {n}] and fill [B, 1, {n}, "
                             f"{n}], got {list(image.shape)} and {list(fill.shape)}; call the "
                             "pipeline itself for other sizes")  # fmt: skip
        draws = self.draw_noise(batch, generator=generator, noise=noise)
        latents, masked_latents = self.encode(image, fill, draws)
        latent_mask = masks.latent_mask(fill.float(), latents.shape[-2:])
        latents = self.denoise(latents, latent_mask, masked_latents, draws, recipe, callback)
        return self.decode(latents)

    def draw_noise(self, batch: int, **kwargs) -> dict[str, torch.Tensor]:
        """The four draws of a native batch (`recipe.draw_noise`: generator= or noise=)."""
        n = self.native_size
        return draw_noise(vae_lib.latent_shape(self.vae, batch, n, n), **kwargs)

    def encode(
        self, image: torch.Tensor, fill: torch.Tensor, draws: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents of the image and of the masked image (holes set to 0 = mid-grey)."""
        masked_image = image * (1 - fill)
        latents = vae_lib.encode(self.vae, image, draws["vae_image"])
        masked_latents = vae_lib.encode(self.vae, masked_image, draws["vae_masked_image"])
        return latents, masked_latents

    def timesteps(self, steps: int, strength: float) -> torch.Tensor:
        """The last int(steps * strength) DDIM timesteps: 20 at 0.99 -> [900, 850, ..., 0]."""
        return schedule(self.scheduler, steps, strength)[1]

    def denoise(self, latents: torch.Tensor, latent_mask: torch.Tensor,
                masked_latents: torch.Tensor, draws: dict[str, torch.Tensor],
                recipe: Recipe = Recipe(),
                callback: StepCallback | None = None) -> torch.Tensor:  # fmt: skip
        """DDIM from the noised image latents with guidance; `callback(i, t, x)` after each step."""
        device, batch, g = self.device, latents.shape[0], recipe.guidance_scale
        scheduler, timesteps = schedule(self.scheduler, recipe.steps, recipe.strength, device)
        noise = (draws["latent"] + recipe.noise_offset * draws["latent_offset"]).to(device)
        # Start from the *original* image's latents noised to the first timestep (strength < 1).
        x = scheduler.add_noise(latents.to(device), noise, timesteps[:1].repeat(batch))
        cond, negative = category_ids(self.unet.config.num_embeddings, recipe.task)
        input_ids = torch.tensor([negative] * batch + [cond] * batch, device=device)  # (2B, 10)
        known = torch.cat([latent_mask, masked_latents], dim=1).to(device).repeat(2, 1, 1, 1)
        for i, t in enumerate(tqdm(timesteps, **self.progress_bar_config)):
            model_input = torch.cat([torch.cat([x, x]), known], dim=1)  # (2B, 9, h, w)
            eps = self.unet(model_input.to(self.dtype), t[None], input_ids).float()
            eps_negative, eps_cond = eps.chunk(2)
            eps = eps_negative + g * (eps_cond - eps_negative)  # classifier-free guidance
            x = scheduler.step(eps, t, x).prev_sample  # DDIM, eta = 0
            if callback is not None:
                callback(i, t, x)
        return x

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> image [B,3,H,W] float32 in about [-1,1] (not clamped)."""
        if self.decoder is not None:
            return tiny_decoder.decode(self.decoder, latents)
        return vae_lib.decode(self.vae, latents)
