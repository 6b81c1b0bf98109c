"""Find the weight files: a local folder (ours or the released layout) or the Hugging Face hub.

Released layout (nothing here is renamed):
  hustvl/Moebius      <variant>/diffusion_pytorch_model.bin   (student, one per variant)
  hustvl/PixelHacker  <variant>/diffusion_pytorch_model.bin   (teacher, one per variant)
  hustvl/PixelHacker  vae/config.json + vae/diffusion_pytorch_model.bin   (the shared VAE)
Our layout (`InpaintPipeline.save_pretrained`): DIR/unet/{config.json, model.safetensors},
DIR/vae/{config.json, diffusion_pytorch_model.safetensors}, DIR/scheduler/scheduler_config.json.

This module imports no torch and no diffusers, so the CLI can report missing weights in well under
a second. It asks the network nothing when the files are cached, and fails fast (no retries)
when it is offline (HF_HUB_OFFLINE=1) or the hub cannot be reached.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from moebius.errors import MoebiusError
from moebius.options import DEFAULT_MODEL, DEFAULT_VARIANT, MODELS, VARIANTS, check_choice

logger = logging.getLogger(__name__)

# The names (MODELS, VARIANTS, defaults) live in moebius.options; here, where they are on the hub.
MODEL_REPOS = dict(zip(MODELS, ("hustvl/Moebius", "hustvl/PixelHacker"), strict=True))
VAE_REPO = "hustvl/PixelHacker"
VAE_FOLDER = "vae"
RELEASED_WEIGHTS_NAME = "diffusion_pytorch_model.bin"  # name of every released weights file
CONFIG_NAME = "config.json"
UNET_FOLDER = "unet"
SCHEDULER_FOLDER = "scheduler"
UNET_WEIGHTS_NAMES = ("model.safetensors", RELEASED_WEIGHTS_NAME)  # ours first, then released
VAE_WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", RELEASED_WEIGHTS_NAME)


class WeightsNotFoundError(MoebiusError, FileNotFoundError):
    """Weights that are neither on disk nor obtainable now; the message lists files and remedies."""


@dataclass(frozen=True)
class WeightFiles:
    """Where each component's files are: network weights (+ config, if any) and the VAE folder."""

    unet_weights: Path
    unet_config: Path | None  # our config.json; None for a released .bin (config = the preset)
    vae_dir: Path
    scheduler_dir: Path | None = None


@dataclass(frozen=True)
class _HubFile:
    repo: str
    filename: str  # path inside the repo


def released_files(variant: str, model: str = DEFAULT_MODEL) -> list[_HubFile]:
    """The hub files a variant needs: the network weights, then the VAE config and weights."""
    check_choice("variant", variant, VARIANTS)
    check_choice("model", model, tuple(MODEL_REPOS))
    return [
        _HubFile(MODEL_REPOS[model], f"{variant}/{RELEASED_WEIGHTS_NAME}"),
        _HubFile(VAE_REPO, f"{VAE_FOLDER}/{CONFIG_NAME}"),
        _HubFile(VAE_REPO, f"{VAE_FOLDER}/{RELEASED_WEIGHTS_NAME}"),
    ]


def resolve(
    pretrained: str | os.PathLike | None = None,
    variant: str = DEFAULT_VARIANT,
    *,
    model: str = DEFAULT_MODEL,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    revision: str | None = None,
) -> WeightFiles:
    """Locate all weight files: a local folder, else the hub repo of `model` (cache first)."""
    check_choice("model", model, tuple(MODEL_REPOS))
    if pretrained is not None and Path(pretrained).is_dir():
        return _resolve_local(Path(pretrained), variant, model)
    if pretrained is not None and _looks_like_path(str(pretrained)):
        raise WeightsNotFoundError(
            f"weights folder {pretrained} does not exist (a hub repo id looks like owner/name)"
        )
    if pretrained is not None and "/" not in str(pretrained):
        # Our repos are always owner/name, so a bare NAME was meant as a folder.
        raise WeightsNotFoundError(
            f"no weights folder named {str(pretrained)!r} exists in {Path.cwd()}. "
            f"To use a Hugging Face hub repo instead, name it as owner/name "
            f"(e.g. {MODEL_REPOS[model]})."
        )
    files = released_files(variant, model)
    if pretrained is not None and pretrained != files[0].repo:
        files[0] = _HubFile(str(pretrained), files[0].filename)
    paths = _download(
        files, cache_dir=cache_dir, local_files_only=local_files_only, revision=revision
    )
    return WeightFiles(unet_weights=paths[0], unet_config=None, vae_dir=paths[1].parent)


def resolve_without_download(
    pretrained: str | os.PathLike | None = None,
    variant: str = DEFAULT_VARIANT,
    *,
    model: str = DEFAULT_MODEL,
    cache_dir: str | os.PathLike | None = None,
) -> WeightFiles | None:
    """`resolve` when it needs no download (a folder, or files in the cache); None when a download
    would be needed and may work. Errors that need no network (no such folder, offline) are raised.
    The CLI calls this before importing torch, and downloads only once the options are checked."""
    hub_repo = pretrained is None or not (
        Path(pretrained).is_dir() or _looks_like_path(str(pretrained)) or "/" not in str(pretrained)
    )
    if not hub_repo or _hub_is_offline():
        return resolve(pretrained, variant, model=model, cache_dir=cache_dir)
    try:
        return resolve(pretrained, variant, model=model, cache_dir=cache_dir, local_files_only=True)
    except WeightsNotFoundError:
        return None


def _looks_like_path(name: str) -> bool:
    """True for what cannot be a hub repo id ("owner/name"): absolute, ./ ~/ or deeper paths."""
    return (
        Path(name).is_absolute()
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or "\\" in name
    )


def download(
    variant: str = DEFAULT_VARIANT,
    *,
    model: str = DEFAULT_MODEL,
    cache_dir: str | os.PathLike | None = None,
) -> WeightFiles:
    """Fetch a variant into the Hugging Face cache (no-op for files already there)."""
    return resolve(None, variant, model=model, cache_dir=cache_dir)


def _first_existing(directory: Path, names: tuple[str, ...]) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def _resolve_local(root: Path, variant: str, model: str) -> WeightFiles:
    """A folder in our format (unet/ + vae/) or a copy of the released one (<variant>/ + vae/)."""
    ours = (root / UNET_FOLDER).is_dir()  # else the released layout, <variant>/ + vae/
    unet_dir, vae_dir = root / (UNET_FOLDER if ours else variant), root / VAE_FOLDER
    config = unet_dir / CONFIG_NAME  # required in ours, optional beside a released .bin
    unet_weights = _first_existing(unet_dir, UNET_WEIGHTS_NAMES)
    vae_weights = _first_existing(vae_dir, VAE_WEIGHTS_NAMES)
    missing = [config] if ours and not config.is_file() else []
    if unet_weights is None:
        missing.append(unet_dir / (UNET_WEIGHTS_NAMES[0] if ours else RELEASED_WEIGHTS_NAME))
    if not (vae_dir / CONFIG_NAME).is_file():
        missing.append(vae_dir / CONFIG_NAME)
    if vae_weights is None:
        missing.append(vae_dir / VAE_WEIGHTS_NAMES[0])
    if missing:
        listing = ", ".join(str(p.relative_to(root)) for p in missing)
        raise WeightsNotFoundError(
            f"{root} is not a complete {model} weights folder: {listing} missing. A weights "
            f"folder is either what InpaintPipeline.save_pretrained writes ({UNET_FOLDER}/, "
            f"{VAE_FOLDER}/) or the released layout ({variant}/{RELEASED_WEIGHTS_NAME}, "
            f"{VAE_FOLDER}/{CONFIG_NAME}, {VAE_FOLDER}/{RELEASED_WEIGHTS_NAME}; the VAE weights "
            "may be .bin or .safetensors)"
        )
    return WeightFiles(
        unet_weights=unet_weights,
        unet_config=config if config.is_file() else None,
        vae_dir=vae_dir,
        scheduler_dir=root / SCHEDULER_FOLDER if (root / SCHEDULER_FOLDER).is_dir() else None,
    )


def _hub_is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout: float = 2.0) -> bool:
    """One TCP connect to the hub endpoint (or HTTPS proxy): answers in `timeout`, no retries."""
    from huggingface_hub import constants

    target = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or constants.ENDPOINT
    url = urlparse(target if "://" in target else f"http://{target}")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _from_cache(file: _HubFile, cache_dir, revision) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            hf_hub_download(
                file.repo,
                file.filename,
                cache_dir=cache_dir,
                revision=revision,
                local_files_only=True,
            )
        )
    except LocalEntryNotFoundError:
        return None


def _download(files: list[_HubFile], *, cache_dir, local_files_only: bool, revision) -> list[Path]:
    """Cache first; fetch only what is missing, and only when the hub can be reached right now."""
    paths = [_from_cache(f, cache_dir, revision) for f in files]
    missing = [f for f, p in zip(files, paths, strict=True) if p is None]
    if not missing:
        return paths
    if local_files_only or _hub_is_offline():
        why = "offline mode is on (HF_HUB_OFFLINE=1 or local_files_only)"
        raise WeightsNotFoundError(_missing_message(files, missing, why, cache_dir))
    if not _hub_reachable():
        raise WeightsNotFoundError(
            _missing_message(files, missing, "the hub cannot be reached", cache_dir)
        )
    from huggingface_hub import hf_hub_download

    for i, (file, path) in enumerate(zip(files, paths, strict=True)):
        if path is None:
            logger.info("downloading %s/%s", file.repo, file.filename)
            paths[i] = Path(
                hf_hub_download(file.repo, file.filename, cache_dir=cache_dir, revision=revision)
            )
    return paths


def _missing_message(files: list[_HubFile], missing: list[_HubFile], why: str, cache_dir) -> str:
    """What is missing, and the two ways to provide it (fill the cache, or a local folder)."""
    from huggingface_hub import constants

    cache = cache_dir or constants.HF_HUB_CACHE
    variant = files[0].filename.split("/")[0]
    model = next((m for m, r in MODEL_REPOS.items() if r == files[0].repo), DEFAULT_MODEL)
    lines = [
        f"Weights not found: {why}, and these files are not in the Hugging Face cache ({cache}):"
    ]
    lines += [f"  {f.repo}: {f.filename}" for f in missing]
    lines += [
        "Fix it in one of two ways:",
        f"  1. with network: `moebius download --model {model} --variant {variant}` "
        "(fills the cache; or copy a filled cache here / point HF_HOME at it);",
        "  2. put the files in a folder laid out like this and pass it with --weights DIR "
        "(Python: InpaintPipeline.from_pretrained(DIR)):",
    ]
    lines += [f"       DIR/{f.filename}    <- https://huggingface.co/{f.repo}" for f in files]
    return "\n".join(lines)
