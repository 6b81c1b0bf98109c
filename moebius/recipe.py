"""The original Moebius inference recipe: its knobs and defaults, guidance ids and scheduler.

Facts from shared/spec/pipeline.md (sections 4.1-4.5); `moebius.pipeline` runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import DDIMScheduler

from moebius import hub
from moebius.options import TASKS

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
        hub.check_choice("task", self.task, TASKS)
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not 0 < self.strength <= 1 or int(self.steps * self.strength) < 1:
            raise ValueError(
                "strength must lie in (0, 1] with int(steps * strength) >= 1, got "
                f"strength={self.strength}, steps={self.steps}"
            )
        if self.compensate and not self.paste:
            raise ValueError("compensate=True corrects the pasted fill, so it needs paste=True")


def category_ids(num_embeddings: int, task: str = "remove") -> tuple[list[int], list[int]]:
    """(condition ids, negative ids) for classifier-free guidance.

    The embedding holds two categories of `num_embeddings // 2` tokens: background (0..9) and
    foreground (10..19). "remove" conditions on background and pushes away from foreground, so the
    hole is filled with what surrounds it (the original's guidance); "object" swaps the two.
    """
    hub.check_choice("task", task, TASKS)
    half = num_embeddings // 2
    background, foreground = list(range(half)), list(range(half, 2 * half))
    return (background, foreground) if task == "remove" else (foreground, background)
