"""Checkpoint I/O: released `.bin` state dicts and our `config.json` + `model.safetensors` folders.

Our format is a folder holding `config.json` ({"model_type": ..., **config fields}) and
`model.safetensors` with the same config in its metadata. State-dict keys are those of the released
checkpoints (`embedding_layer.*`, `diff_model.*`), so both formats load with `strict=True`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from moebius.errors import MissingFileError, MoebiusError

# File names have one home, the torch-free `moebius.hub` (the CLI reads them without torch).
from moebius.hub import CONFIG_NAME, UNET_WEIGHTS_NAMES
from moebius.hub import RELEASED_WEIGHTS_NAME as ORIGINAL_WEIGHTS_NAME
from moebius.options import DEFAULT_MODEL

logger = logging.getLogger(__name__)

WEIGHTS_NAME = UNET_WEIGHTS_NAMES[0]  # model.safetensors


class CheckpointError(MoebiusError, ValueError):
    """A weights file that cannot be used as it is; the message says why and what to do."""


def _model_registry() -> dict[str, tuple[type, type]]:
    """model_type -> (config class, model class); imported lazily to keep this module light."""
    from moebius.models import student

    registry = {"moebius": (student.MoebiusConfig, student.MoebiusUNet)}
    try:
        from moebius.models import teacher

        registry["pixelhacker"] = (teacher.PixelHackerConfig, teacher.PixelHackerUNet)
    except ImportError:  # pragma: no cover - teacher module absent in a stripped install
        pass
    return registry


def model_type_of(model_or_config: Any) -> str:
    """The `model_type` string under which a model or config is saved."""
    config = getattr(model_or_config, "config", model_or_config)
    for name, (config_cls, _) in _model_registry().items():
        if isinstance(config, config_cls):
            return name
    raise TypeError(f"no registered model type for {type(config).__name__}")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a plain tensor state dict from `.safetensors` or a released `.bin` (no code run)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): download or save it again")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({err}): it is truncated or corrupt, "
                "e.g. an interrupted download or copy; download or save it again"
            ) from err
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as err:  # a zip archive cut short, or no data at all
        raise CheckpointError(
            f"{path} is truncated or corrupt ({_first_line(err)}); download or save it again"
        ) from err
    except (pickle.UnpicklingError, AttributeError) as err:
        raise CheckpointError(
            f"{path} is not a plain tensor state dict and was not loaded: it is corrupt or holds "
            "pickled Python objects, which could run code. Re-save it as "
            "`torch.save(model.state_dict())` or as safetensors"
        ) from err
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{path} holds a {type(state).__name__}, not a dict of name -> tensor; "
            "expected a plain "
            "state dict like the released diffusion_pytorch_model.bin"
        )
    return state


def save_original(model: nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write the released layout: `torch.save` of a plain state dict (optionally in `dtype`)."""
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu()
        for k, v in model.state_dict().items()
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def released_config(model_type: str):
    """The released architecture of `model_type` ("moebius" or "pixelhacker")."""
    registry = _model_registry()
    if model_type not in registry:
        raise ValueError(f"unknown model {model_type!r}; choose one of {sorted(registry)}")
    return registry[model_type][0]()


def config_to_dict(config: Any) -> dict[str, Any]:
    """Dataclass config -> JSON-ready dict with its `model_type`."""
    return {"model_type": model_type_of(config), **dataclasses.asdict(config)}


def config_from_dict(data: dict[str, Any]):
    """Inverse of `config_to_dict`: lists become tuples so frozen configs compare equal."""
    data = dict(data)
    model_type = data.pop("model_type", DEFAULT_MODEL)
    registry = _model_registry()
    if model_type not in registry:
        raise CheckpointError(f"unknown model_type {model_type!r}; known: {sorted(registry)}")
    config_cls = registry[model_type][0]
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CheckpointError(
            f"config.json has fields {config_cls.__name__} does not know: {unknown}"
        )
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return config_cls(**data)


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Save `config.json` + `model.safetensors` (config also in the safetensors metadata)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_json = json.dumps(config_to_dict(model.config), indent=2)
    (directory / CONFIG_NAME).write_text(config_json + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"config": config_json})
    return directory


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from `path`; a malformed file raises CheckpointError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{path} is not valid JSON ({err}); fix it, or save the model again"
        ) from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object {{...}}")
    return data


def load_config(directory: str | Path):
    """Read the config of a saved model folder."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise MissingFileError(
            f"{path} not found: a model folder holds {CONFIG_NAME} + {WEIGHTS_NAME}"
        )
    try:
        return config_from_dict(read_json(path))
    except CheckpointError as err:
        message = str(err) if str(path) in str(err) else f"{path}: {err}"
        raise CheckpointError(message) from err
    except (TypeError, ValueError) as err:  # a field of the wrong type or value
        raise CheckpointError(f"{path} does not describe a valid model: {err}") from err


def build_model(config) -> nn.Module:
    """Construct the model class that belongs to `config` (random init)."""
    return _model_registry()[model_type_of(config)][1](config)


def load_into(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a weights file into `model` strictly, with an error that lists what does not fit."""
    state = load_state_dict_file(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            details.append(
                f"{len(wrong)} of another shape (e.g. {k}: file {list(state[k].shape)}, "
                f"model {list(own[k].shape)})"
            )
        raise CheckpointError(
            f"{path} does not fit {type(model).__name__}: "
            + "; ".join(details)
            + ". Check that the config matches the weights (e.g. --model, variant or config.json)."
        )
    # load_state_dict copies into the model's own dtype, so 16-bit files load into fp32 models.
    model.load_state_dict(state, strict=True)
    return model


def load_pretrained(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a folder in our format (or a folder with config.json + a released .bin); eval mode."""
    directory = Path(directory)
    config = load_config(directory)
    for name in (WEIGHTS_NAME, ORIGINAL_WEIGHTS_NAME):
        if (directory / name).is_file():
            break
    else:
        raise MissingFileError(
            f"no weights in {directory}: expected {WEIGHTS_NAME} (or {ORIGINAL_WEIGHTS_NAME})"
        )
    model = load_into(build_model(config), directory / name)
    return model.to(device=device, dtype=dtype).eval()


def convert_original(bin_path: str | Path, config, out_dir: str | Path) -> Path:
    """Turn a released `.bin` into our folder format (fp32)."""
    model = load_into(build_model(config), bin_path)
    logger.info("converted %s -> %s", bin_path, out_dir)
    return save_pretrained(model, out_dir)
