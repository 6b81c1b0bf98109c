"""InpaintPipeline: the released recipe, prepare -> encode -> denoise -> decode -> composite.

The network (student or teacher) only maps tensors to tensors; this file is the one place that
knows images, masks, the VAE, the DDIM scheduler and classifier-free guidance. `run` is the
original recipe at the model's native size (shared/spec/pipeline.md, section 4); `__call__` takes
images of any size and mode and hands `run` native-size windows through `moebius.strategies`.
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

from moebius import hub, images, masks, strategies
from moebius import vae as vae_lib
from moebius.models import checkpoints
from moebius.models.optimize import optimize as optimize_model
from moebius.options import DEFAULT_MODEL
from moebius.recipe import (  # noqa: F401 (public names of the pipeline API)
    NOISE_KEYS,
    NOISE_OFFSET,
    TASKS,
    Recipe,
    category_ids,
    make_scheduler,
)

logger = logging.getLogger(__name__)

# callback(step index, timestep, latents after the step), e.g. for progress or to record a trace.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


class InpaintPipeline:
    """Moebius inpainting: `pipe(image, mask) -> image`; `unet`, `vae`, `scheduler` are public."""

    def __init__(self, unet: torch.nn.Module, vae, scheduler: DDIMScheduler | None = None):
        self.unet = unet.eval()
        self.vae = vae.eval()
        self.scheduler = scheduler or make_scheduler()
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
        files = hub.resolve(
            pretrained,
            variant,
            model=model or DEFAULT_MODEL,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            revision=revision,
        )
        return cls.from_files(files, model=model, config=config)

    @classmethod
    def from_files(
        cls, files: hub.WeightFiles, *, model: str | None = None, config=None
    ) -> InpaintPipeline:
        """Build the pipeline from resolved weight files (see `moebius.hub.resolve`)."""
        if files.unet_config is not None:
            saved = checkpoints.load_config(files.unet_config.parent)
            if config is not None and config != saved:
                raise ValueError(f"config= differs from {files.unet_config}; drop one of them")
            config = saved
        config = config or checkpoints.released_config(model or DEFAULT_MODEL)
        if model is not None and checkpoints.model_type_of(config) != model:
            raise ValueError(
                f"the weights are a {checkpoints.model_type_of(config)!r} model, "
                f"not {model!r}; pass the matching model= / --model"
            )
        unet = checkpoints.load_into(checkpoints.build_model(config), files.unet_weights)
        vae = vae_lib.load_vae(files.vae_dir)
        scheduler = (
            DDIMScheduler.from_pretrained(files.scheduler_dir)
            if files.scheduler_dir is not None
            else make_scheduler()
        )
        return cls(unet, vae, scheduler)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write unet/ (config.json + model.safetensors), vae/ and scheduler/ under `directory`."""
        if getattr(self.unet, "optimized_dtype", None) is not None:
            raise ValueError("an optimize()d pipeline holds folded weights: save the plain one")
        directory = Path(directory)
        checkpoints.save_pretrained(self.unet, directory / hub.UNET_FOLDER)
        self.vae.save_pretrained(directory / hub.VAE_FOLDER, safe_serialization=True)
        self.scheduler.save_pretrained(directory / hub.SCHEDULER_FOLDER)
        return directory

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> InpaintPipeline:
        """Move the networks to `device` / cast them to `dtype` (DDIM math stays float32)."""
        for module in (self.unet, self.vae):
            module.to(device=device)
            if dtype is not None and dtype != next(module.parameters()).dtype:
                module.to(dtype=dtype)
        return self

    def optimize(self, dtype: torch.dtype | None = None) -> InpaintPipeline:
        """Swap in the fast UNet (`moebius.models.optimize`): same outputs in float32, or
        bfloat16 / float16 where the device runs it natively; the VAE stays as it is."""
        self.unet = optimize_model(self.unet, dtype)
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
        Native-size inputs are batched straight into `run`. `task` "remove" fills with background,
        "object" generates an object. `noise` (the four draws of one native batch, NOISE_KEYS)
        replaces drawing from `generator` for exact reproduction of the original.
        """
        single = isinstance(image, Image.Image)
        image_list = [image] if single else list(image)
        mask_list = [mask] if single else list(mask)
        if len(image_list) != len(mask_list):
            raise ValueError(
                f"got {len(image_list)} images but {len(mask_list)} masks; pass one mask per image"
            )
        hub.check_choice("strategy", strategy, strategies.STRATEGIES)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        recipe = Recipe(steps, strength, guidance_scale, noise_offset, paste, compensate, task)

        def run(windows: list[Image.Image], window_masks: list[Image.Image]) -> list[Image.Image]:
            return self.run(windows, window_masks, recipe, generator=generator, noise=noise,
                            callback=callback)  # fmt: skip

        inputs = [images.to_rgb(im) for im in image_list]
        fills = [
            masks.prepare_mask(
                m, rgb.size, invert=invert_mask, dilation=mask_dilation, resize=resize_mask
            )
            for m, (rgb, _) in zip(mask_list, inputs, strict=True)
        ]
        rgbs = [rgb for rgb, _ in inputs]
        results = self._fill(rgbs, fills, run, strategy, margin, batch_size, noise is not None)
        outputs = [
            image_list[i].copy() if r is None else images.restore(r, inputs[i][1])
            for i, r in enumerate(results)
        ]
        return outputs[0] if single else outputs

    def _fill(self, rgbs, fills, run, strategy, margin, batch_size, one_batch) -> list:
        """Native-size images to `run` in batches, the rest via `strategies`; None = no hole."""
        native = (self.native_size, self.native_size)
        todo = [i for i, fill in enumerate(fills) if fill.any()]  # empty mask: nothing to do
        direct = [i for i in todo if rgbs[i].size == native and strategy in ("auto", "native")]
        if one_batch and direct != todo:
            raise ValueError(
                "noise= holds the draws of one native-size batch, so every image must be "
                f"{native[0]}x{native[1]} with strategy 'auto' or 'native'; use "
                "generator= for other sizes"
            )
        results: list[Image.Image | None] = [None] * len(rgbs)
        step = max(len(direct), 1) if one_batch else batch_size
        for start in range(0, len(direct), step):
            chunk = direct[start : start + step]
            outs = run([rgbs[i] for i in chunk], [masks.mask_to_image(fills[i]) for i in chunk])
            for i, out in zip(chunk, outs, strict=True):
                results[i] = out
        for i in todo:
            if results[i] is None:
                results[i] = strategies.inpaint_any_size(
                    rgbs[i], fills[i], self.native_size, run, strategy, margin,
                    batch_size=batch_size,
                )  # fmt: skip
        return results

    # ----------------------------------------------------------------------------- native size
    @torch.inference_mode()
    def run(
        self,
        image_list: Sequence[Image.Image],
        mask_list: Sequence[Image.Image],
        recipe: Recipe = Recipe(),
        *,
        generator: torch.Generator | None = None,
        noise: dict[str, torch.Tensor] | None = None,
        callback: StepCallback | None = None,
    ) -> list[Image.Image]:
        """The original recipe on a batch of native-size RGB images and masks (255 = fill)."""
        image, mask = self.prepare(image_list, mask_list)
        draws = self.draw_noise(image.shape[0], generator=generator, noise=noise)
        latents, masked_latents = self.encode(image, mask, draws)
        latent_mask = masks.latent_mask(mask.float(), latents.shape[-2:])
        latents = self.denoise(latents, latent_mask, masked_latents, draws, recipe, callback)
        decoded = self.decode(latents)
        return self.composite(decoded, image_list, mask_list, recipe)

    def prepare(
        self, image_list: Sequence[Image.Image], mask_list: Sequence[Image.Image]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image [B,3,H,W] float32 in [-1,1] and hole mask [B,1,H,W] uint8 (1 = fill), on CPU."""
        size = (self.native_size, self.native_size)
        if len(image_list) != len(mask_list) or not image_list:
            raise ValueError(
                f"run needs as many masks as images (>= 1), got {len(image_list)} "
                f"images and {len(mask_list)} masks"
            )
        for im in image_list:
            if im.mode != "RGB" or im.size != size:
                raise ValueError(
                    f"run takes RGB images of the native size {size[0]}x{size[1]}, got "
                    f"{im.mode} {im.size[0]}x{im.size[1]}; call the pipeline itself "
                    "for other sizes and modes"
                )
        image = torch.cat([images.pil_to_tensor(im) for im in image_list])
        fill = [masks.prepare_mask(m, size) for m in mask_list]  # thresholded at 127.5
        mask = torch.from_numpy(np.stack(fill).astype(np.uint8))[:, None]  # (B, 1, H, W)
        return image, mask

    def draw_noise(
        self,
        batch: int,
        *,
        generator: torch.Generator | None = None,
        noise: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """The four N(0, I) draws (NOISE_KEYS order) from `generator`, or `noise` after a check."""
        n = self.native_size
        shape = vae_lib.latent_shape(self.vae, batch, n, n)
        shapes = dict(zip(NOISE_KEYS, [shape, shape, shape, (*shape[:2], 1, 1)], strict=True))
        if noise is not None and generator is not None:
            raise ValueError("pass generator= (draw the noise) or noise= (given draws), not both")
        if noise is None:
            gen_device = generator.device if generator is not None else torch.device("cpu")
            return {
                k: torch.randn(s, generator=generator, device=gen_device) for k, s in shapes.items()
            }
        given = {k: tuple(v.shape) for k, v in noise.items()}
        if given != {k: tuple(s) for k, s in shapes.items()}:
            raise ValueError(
                f"noise= must map exactly {list(NOISE_KEYS)} to shapes "
                f"{[list(s) for s in shapes.values()]}, got {given}"
            )
        return {k: noise[k].float() for k in NOISE_KEYS}

    def encode(
        self, image: torch.Tensor, mask: torch.Tensor, draws: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents of the image and of the masked image (holes set to 0 = mid-grey)."""
        masked_image = image * (1 - mask)
        latents = vae_lib.encode(self.vae, image, draws["vae_image"])
        masked_latents = vae_lib.encode(self.vae, masked_image, draws["vae_masked_image"])
        return latents, masked_latents

    def timesteps(self, steps: int, strength: float) -> torch.Tensor:
        """The last int(steps * strength) DDIM timesteps: 20 at 0.99 -> [900, 850, ..., 0]."""
        self.scheduler.set_timesteps(steps, device=self.device)
        return self.scheduler.timesteps[steps - min(int(steps * strength), steps) :]

    def denoise(
        self,
        latents: torch.Tensor,
        latent_mask: torch.Tensor,
        masked_latents: torch.Tensor,
        draws: dict[str, torch.Tensor],
        recipe: Recipe = Recipe(),
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        """DDIM from the noised image latents with guidance; `callback(i, t, x)` after each step."""
        device, batch, g = self.device, latents.shape[0], recipe.guidance_scale
        timesteps = self.timesteps(recipe.steps, recipe.strength)
        noise = (draws["latent"] + recipe.noise_offset * draws["latent_offset"]).to(device)
        # Start from the *original* image's latents noised to the first timestep (strength < 1).
        x = self.scheduler.add_noise(latents.to(device), noise, timesteps[:1].repeat(batch))
        cond, negative = category_ids(self.unet.config.num_embeddings, recipe.task)
        input_ids = torch.tensor([negative] * batch + [cond] * batch, device=device)  # (2B, 10)
        known = torch.cat([latent_mask, masked_latents], dim=1).to(device).repeat(2, 1, 1, 1)
        for i, t in enumerate(tqdm(timesteps, **self.progress_bar_config)):
            model_input = torch.cat([torch.cat([x, x]), known], dim=1)  # (2B, 9, h, w)
            eps = self.unet(model_input.to(self.dtype), t[None], input_ids).float()
            eps_negative, eps_cond = eps.chunk(2)
            eps = eps_negative + g * (eps_cond - eps_negative)  # classifier-free guidance
            x = self.scheduler.step(eps, t, x).prev_sample  # DDIM, eta = 0
            if callback is not None:
                callback(i, t, x)
        return x

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> image [B,3,H,W] float32 in about [0,1] (not clamped)."""
        return vae_lib.decode(self.vae, latents)

    def composite(
        self,
        decoded: torch.Tensor,
        image_list: Sequence[Image.Image],
        mask_list: Sequence[Image.Image],
        recipe: Recipe = Recipe(),
    ) -> list[Image.Image]:
        """uint8 results, pasted into the inputs with the blurred mask (+ colour compensation)."""
        results = images.tensor_to_uint8(decoded)  # (B, H, W, 3), truncated
        outputs = []
        for result, image, mask in zip(results, image_list, mask_list, strict=True):
            mask_L = masks.mask_to_image(masks.prepare_mask(mask, image.size))
            if recipe.compensate:
                result = masks.paste_compensate(result, np.asarray(image), mask_L)
            elif recipe.paste:
                result = masks.paste(result, np.asarray(image), mask_L)
            outputs.append(Image.fromarray(result))
        return outputs
