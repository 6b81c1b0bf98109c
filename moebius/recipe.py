"""The original Moebius inference recipe: its knobs and defaults, guidance ids and scheduler.

Facts from shared/spec/pipeline.md (sections 4.1-4.5); `moebius.pipeline` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from moebius import options
from moebius.options import TASKS  # noqa: F401 (re-exported: the pipeline API names it)

NOISE_OFFSET = 0.0357  # std of the per-sample, per-channel constant added to the initial noise
# The four draws of the original, in its order: VAE posterior eps of the image and of the masked
# image [B,4,h,w], the initial noise [B,4,h,w], and the noise offset [B,4,1,1].
NOISE_KEYS = ("vae_image", "vae_masked_image", "latent", "latent_offset")


def make_scheduler() -> DDIMScheduler:
    """DDIM as the original: SD scaled-linear betas, no clipping, the rest diffusers' defaults."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
    )


def schedule(scheduler: DDIMScheduler, steps: int, strength: float, device=None):
    """(fresh scheduler set to `steps`, its last int(steps * strength) timesteps).

    20 steps at 0.99 -> [900, 850, ..., 0]. A copy is set, so `scheduler` (shared by every call
    of a pipeline, possibly from several threads) is never mutated.
    """
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(steps, device=device)
    return fresh, fresh.timesteps[steps - min(int(steps * strength), steps) :]


def draw_noise(
    latent_shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    noise: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The four N(0, I) draws (NOISE_KEYS order) for latents of `latent_shape` [B, C, h, w],
    from `generator`, or the given `noise` after a check of its keys and shapes."""
    shape = tuple(latent_shape)
    shapes = dict(zip(NOISE_KEYS, [shape, shape, shape, (*shape[:2], 1, 1)], strict=True))
    if noise is not None and generator is not None:
        raise ValueError("pass generator= (draw the noise) or noise= (given draws), not both")
    if noise is None:
        device = generator.device if generator is not None else torch.device("cpu")
        return {k: torch.randn(s, generator=generator, device=device) for k, s in shapes.items()}
    given = {k: tuple(v.shape) for k, v in noise.items()}
    if given != shapes:
        raise ValueError(
            f"noise= must map exactly {list(NOISE_KEYS)} to shapes "
            f"{[list(s) for s in shapes.values()]} (one batch of every window of the call), "
            f"got {given}"
        )
    return {k: noise[k].float() for k in NOISE_KEYS}


@dataclass(frozen=True)
class Recipe:
    """The knobs of the original recipe, with its defaults (shared/spec/pipeline.md 4.1-4.5)."""

    steps: int = 20  # DDIM steps of the full schedule
    strength: float = 0.99  # run the last int(steps * strength) of them: 19 from t=900
    guidance_scale: float = 2.5
    noise_offset: float = NOISE_OFFSET
    paste: bool = True  # paste the result into the input with the blurred mask
    compensate: bool = False  # shift the fill's colour toward its surroundings (needs paste)
    task: str = "remove"  # or "object", see `category_ids`

    def __post_init__(self):
        options.validate(steps=self.steps, strength=self.strength, task=self.task,
                         guidance_scale=self.guidance_scale,
                         noise_offset=self.noise_offset)  # fmt: skip
        if self.compensate and not self.paste:
            raise ValueError("compensate=True corrects the pasted fill, so it needs paste=True")


def category_ids(num_embeddings: int, task: str = "remove") -> tuple[list[int], list[int]]:
    """(condition ids, negative ids) for classifier-free guidance.

    The embedding holds two categories of `num_embeddings // 2` tokens: background (0..9) and
    foreground (10..19). "remove" conditions on background and pushes away from foreground, so the
    hole is filled with what surrounds it (the original's guidance); "object" swaps the two.
    """
    options.validate_task(task)
    half = num_embeddings // 2
    background, foreground = list(range(half)), list(range(half, 2 * half))
    return (background, foreground) if task == "remove" else (foreground, background)
