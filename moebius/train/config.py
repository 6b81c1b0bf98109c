"""Training configuration: one frozen dataclass tree, read from JSON, changed by `--set` keys.

`TrainConfig` groups `data`, `model`, `loss`, `optim` and `run` sections; the defaults are the
original recipe (shared/spec/training.md 3.5-3.6, 4.1-4.2). A preset JSON (configs/*.json) only
lists what differs. Unknown keys and wrong types are errors that name the key, because a typo that
is silently ignored would train another model than the one asked for.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moebius.train.step import LossConfig

MODES = ("distill", "finetune", "teacher_free")
PRECISIONS = ("auto", "bf16", "fp32")  # auto = bf16 autocast where the device supports it
PROMPTS = ("background", "foreground")


@dataclass(frozen=True)
class DataConfig:
    """Where the samples come from and how they are augmented (spec 4.2)."""

    manifest: str | None = None  # jsonl of {"image", "prompt", "mask"?}, paths relative to it
    latent_cache: str | None = None  # folder from `moebius train cache-latents` (no VAE encoder)
    resolution: int = 512  # shorter side after the LANCZOS resize = square crop side
    mask_protocol: str = "medium_512"  # generator preset of moebius.mask_generators
    generated_mask_p: float = 0.5  # background rows: chance of a generated mask over the row's own
    dilation_p: float = 0.99  # chance of the random 3/5/7-kernel, 1-2 iteration dilation
    flip_p: float = 0.5
    num_workers: int = 4
    skip_unreadable: bool = False  # False: an unreadable image stops the run naming the file


@dataclass(frozen=True)
class ModelConfig:
    """The networks: "released" / "tiny" architectures, optional weights, the VAE folder."""

    student: str = "released"  # architecture: "released" (0.226B) or "tiny"
    student_weights: str | None = None  # .bin / .safetensors / save_pretrained folder to start from
    teacher: str | None = "released"  # "released" (PixelHacker 0.862B), "tiny" or None
    teacher_weights: str | None = None  # required for a "released" teacher
    vae: str = "vae"  # AutoencoderKL folder, or "tiny" (seeded random, for tests)
    init_seed: int = 0  # seeds random initialisation of everything not loaded from a file
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class OptimConfig:
    """Muon + AdamW (moebius.train.build_optimizer), constant LR after a linear warm-up."""

    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    ema: bool = False  # the demo recipe trains without EMA
    ema_decay: float = 0.9999


@dataclass(frozen=True)
class RunConfig:
    """Length, batch, precision, randomness, logging and checkpoint cadence."""

    mode: str = "distill"  # distill | finetune | teacher_free
    max_steps: int = 200_000
    batch_size: int = 2  # per process
    seed: int = 42
    precision: str = "auto"
    noise_offset: float = 0.0357  # std of the per-channel offset added to the training noise
    log_every: int = 1
    save_every: int = 3000
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (0 = all)
    progress: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; `config.json` in the output folder is its JSON form."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        _check_choice("run.mode", self.run.mode, MODES)
        _check_choice("run.precision", self.run.precision, PRECISIONS)
        for key in ("run.max_steps", "run.batch_size", "run.log_every", "run.save_every"):
            if get_key(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {get_key(self, key)}")
        if self.data.resolution % 8:
            raise ValueError(f"data.resolution must be a multiple of 8, got {self.data.resolution}")
        for key in ("data.generated_mask_p", "data.dilation_p", "data.flip_p"):
            if not 0 <= get_key(self, key) <= 1:
                raise ValueError(f"{key} is a probability in [0, 1], got {get_key(self, key)}")
        if self.run.mode == "distill" and self.model.teacher is None:
            raise ValueError('run.mode "distill" needs a teacher: set model.teacher')
        if self.run.mode == "finetune" and self.model.student_weights is None:
            raise ValueError('run.mode "finetune" starts from weights: set model.student_weights')
        if self.model.teacher is None and self.loss.needs_teacher:
            raise ValueError(
                "output / feature KD compare against a teacher, but model.teacher is null: "
                "set loss.output_kd=false and loss.feature_kd=false (teacher-free training) "
                "or give a teacher"
            )
        if self.run.mode == "teacher_free" and self.model.teacher is not None:
            raise ValueError(
                'run.mode "teacher_free" trains without a teacher: set model.teacher to null '
                "(or use mode distill / finetune)"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict (tuples become lists)."""
        return dataclasses.asdict(self)


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")


# ------------------------------------------------------------------------------ dict <-> config
def _coerce(key: str, value, annotation):
    """Check / convert a JSON value to the field's annotated type (str | None, int, tuples...)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(key, value, option)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise TypeError(errors[0])
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, prefix=f"{key}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{key} must be a list, got {value!r}")
        args = typing.get_args(annotation)
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if item is None and len(args) != len(value):
            raise TypeError(f"{key} must have {len(args)} items, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, item or args[i]) for i, v in enumerate(value))
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise TypeError(f"{key} must be {annotation.__name__}, got {value!r}")
        return value
    return value  # Any


def from_dict(cls, data: dict[str, Any], prefix: str = ""):
    """Build dataclass `cls` from a (nested) dict; unknown keys and wrong types raise."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise TypeError(f"{prefix.rstrip('.') or 'config'} must be an object, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; "
            f"{cls.__name__} has {sorted(fields)}"
        )
    return cls(**{k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()})


def get_key(config, dotted: str):
    """`get_key(cfg, "run.batch_size")`."""
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def parse_value(text: str):
    """A --set value: JSON when it parses (1e-4, true, null, [2, 5]), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `KEY=VALUE` strings with dotted keys (`data.manifest=train.jsonl`) to a nested dict."""
    data = json.loads(json.dumps(data))  # deep copy
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE with a dotted key, got {item!r}")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part} is not a section")
        node[leaf] = parse_value(text)
    return data


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a JSON preset (None: all defaults), apply `--set` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
    return from_dict(TrainConfig, apply_overrides(data, list(overrides)))


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as indented JSON."""
    Path(path).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
