"""The choices and limits of every user-facing option, and their validation. Imports no torch.

One home for the names a user can type (models, variants, strategies, tasks, dtypes, devices) and
for the checks of the numbers (steps, strength, guidance, ...). The CLI builds its argparse
`choices` from here and validates before it resolves weights or imports torch; the pipeline calls
the same `validate` so the Python API raises the same `ValueError` for the same values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from numbers import Integral, Real

MODELS = ("moebius", "pixelhacker")  # the student and its PixelHacker teacher
DEFAULT_MODEL = "moebius"
VARIANTS = ("pretrained", "ft_places2", "ft_celebahq", "ft_ffhq")  # released checkpoints per model
DEFAULT_VARIANT = "ft_places2"
# auto: native-size images run whole, larger ones as crop windows around the mask regions.
STRATEGIES = ("auto", "native", "crop", "resize")
TASKS = ("remove", "object")  # fill with background, or generate an object (guidance swapped)
DTYPES = ("float32", "float16", "bfloat16")
# `moebius eval`: mask protocols (the keys of moebius.mask_generators.PROTOCOLS, same order) and
# methods (the two networks plus classical baselines that need no weights)
MASK_PROTOCOLS = ("thin_256", "thin_512", "medium_256", "medium_512", "thick_256", "thick_512",
                  "area_40_50")  # fmt: skip
BASELINES = ("telea", "navier-stokes", "mean")
EVAL_METHODS = (*MODELS, *BASELINES)
DEVICE_KINDS = ("auto", "cpu", "cuda", "mps")  # "cuda:1" selects a GPU by index
# Images above this many pixels are refused from their header, before any decoding: 100 MP holds
# a 10000 x 10000 photo (0.3 GB decoded) and still stops a 60 KB PNG that claims 30000 x 30000.
DEFAULT_MAX_PIXELS = 100_000_000

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming the allowed values when `value` is not one of them."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def _integer(name: str, value: object, minimum: int, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({meaning}), got {value!r}")


def _finite(name: str, value: object, meaning: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number ({meaning}), got {value!r}")


def validate_steps(value: object, name: str = "steps") -> None:
    _integer(name, value, 1, "DDIM steps of the full schedule; the original uses 20")


def validate_strength(value: object, name: str = "strength") -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value <= 1:  # nan too
        raise ValueError(
            f"{name} must lie in (0, 1] (share of the schedule that runs; 0.99 in the original "
            f"recipe), got {value!r}"
        )


def validate_guidance_scale(value: object, name: str = "guidance_scale") -> None:
    _finite(name, value, "classifier-free guidance scale; the original uses 2.5, 1 = no guidance")


def validate_noise_offset(value: object, name: str = "noise_offset") -> None:
    _finite(name, value, "std of the per-channel noise offset; the original uses 0.0357")


def validate_batch_size(value: object, name: str = "batch_size") -> None:
    _integer(name, value, 1, "native-size windows per model call")


def validate_dilation(value: object, name: str = "mask_dilation") -> None:
    _integer(name, value, 0, "pixels the mask grows by; 0 keeps it as drawn")


def validate_margin(value: object, name: str = "margin") -> None:
    _integer(name, value, 0, "context pixels kept around a crop region")


def validate_max_pixels(value: object, name: str = "max_pixels") -> None:
    _integer(name, value, 1, f"largest image accepted, in pixels; default {DEFAULT_MAX_PIXELS}")


def validate_strategy(value: object, name: str = "strategy") -> None:
    check_choice(name, value, STRATEGIES)


def validate_task(value: object, name: str = "task") -> None:
    check_choice(name, value, TASKS)


def validate_model(value: object, name: str = "model") -> None:
    check_choice(name, value, MODELS)


def validate_variant(value: object, name: str = "variant") -> None:
    check_choice(name, value, VARIANTS)


def validate_dtype(value: object, name: str = "dtype") -> None:
    check_choice(name, value, DTYPES)


def validate_device(value: object, name: str = "device") -> None:
    """The spelling of a device only; whether it exists needs torch (the CLI checks that next)."""
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise ValueError(
            f"unknown {name} {value!r}; choose one of: {', '.join(DEVICE_KINDS)} "
            "(or cuda:N for the N-th GPU)"
        )


# Pipeline keyword -> its check. `validate(**kwargs)` runs these; the names are the keywords of
# `InpaintPipeline.__call__`, so an error names the argument the caller wrote.
VALIDATORS: dict[str, Callable[[object, str], None]] = {
    "steps": validate_steps,
    "strength": validate_strength,
    "guidance_scale": validate_guidance_scale,
    "noise_offset": validate_noise_offset,
    "strategy": validate_strategy,
    "margin": validate_margin,
    "mask_dilation": validate_dilation,
    "task": validate_task,
    "batch_size": validate_batch_size,
    "model": validate_model,
    "variant": validate_variant,
    "dtype": validate_dtype,
    "device": validate_device,
    "max_pixels": validate_max_pixels,
}


def validate(names: dict[str, str] | None = None, **values: object) -> None:
    """Check each given option (None = unset, skipped); the first bad one raises ValueError.

    `names` maps a keyword to how the caller spells it in messages (the CLI passes its flags,
    e.g. {"guidance_scale": "--guidance"}). When both `steps` and `strength` are given, at least
    one step must run: int(steps * strength) >= 1.
    """
    names = names or {}
    for key, value in values.items():
        if key not in VALIDATORS:
            raise TypeError(f"validate() got an unknown option {key!r}; known: {list(VALIDATORS)}")
        if value is not None:
            VALIDATORS[key](value, names.get(key, key))
    steps, strength = values.get("steps"), values.get("strength")
    if steps is not None and strength is not None and int(steps * strength) < 1:
        raise ValueError(
            f"{names.get('strength', 'strength')}={strength} with {names.get('steps', 'steps')}="
            f"{steps} runs int(steps * strength) = 0 steps; raise one of them"
        )
