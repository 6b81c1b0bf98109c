"""Request and response bodies of the HTTP API (pydantic; every field described for /docs)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    """Every error answer: a short name and what to do about it (never a traceback)."""

    error: str = Field(description="short name of the problem, e.g. 'mask size mismatch'")
    detail: str = Field(description="what was expected, what was received, what to do")


class Health(BaseModel):
    status: Literal["loading", "ready", "error", "stopping"] = Field(
        description="loading: the model is loading; ready: requests are served; error: loading "
        "failed (see detail); stopping: the server is shutting down"
    )
    queue_depth: int = Field(description="requests waiting or running")
    queue_size: int = Field(description="most requests that may wait; more are answered 503")
    detail: str | None = Field(None, description="why loading failed, when status is 'error'")


class Info(BaseModel):
    version: str = Field(description="moebius-inpaint version")
    model: str = Field(description="network: moebius (the student) or pixelhacker (the teacher)")
    variant: str | None = Field(description="released checkpoint variant, when loaded from one")
    weights: str | None = Field(description="--weights as given (folder or hub repo), or None")
    device: str | None = Field(description="device the networks run on (None while loading)")
    dtype: str | None = Field(description="dtype of the networks (None while loading)")
    native_size: int | None = Field(description="side of the square the network runs at, px")
    defaults: dict = Field(description="value of every option a request may leave out")
    limits: dict = Field(description="queue size, max pixels, max upload MB, time limit (s)")


class IOPaintInpaintRequest(BaseModel):
    """IOPaint's `POST /api/v1/inpaint` body. Fields not listed here are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    image: str = Field(description="the image, base64 (a data:image/...;base64, prefix is allowed)")
    mask: str = Field(
        description="the mask, base64 greyscale of the image's size: 255 = fill, thresholded at 127"
    )
    hd_strategy: Literal["Original", "Resize", "Crop"] = Field(
        "Crop",
        description="Crop: a window around each mask region when the longest side exceeds "
        "hd_strategy_crop_trigger_size; Resize: the whole image fitted to the model's native size "
        "when the longest side exceeds hd_strategy_resize_limit; Original (and below those sizes): "
        "strategy 'auto' (native-size images whole, others cropped around the mask)",
    )
    hd_strategy_crop_margin: int = Field(
        128, ge=0, description="context pixels around each mask region in a crop window"
    )
    hd_strategy_crop_trigger_size: int = Field(
        800, ge=0, description="Crop applies when the image's longest side is above this"
    )
    hd_strategy_resize_limit: int = Field(
        1280, ge=0, description="Resize applies when the image's longest side is above this"
    )
    sd_seed: int | None = Field(None, description="noise seed; -1 = random; default 0")
    sd_steps: int | None = Field(None, description="DDIM steps (default: the recipe's 20)")
    sd_guidance_scale: float | None = Field(
        None, description="classifier-free guidance scale (default: the recipe's 2.5)"
    )


class IOPaintModelInfo(BaseModel):
    """IOPaint's ModelInfo: what its web client reads to decide which controls to show."""

    name: str = Field(description="model name")
    path: str = Field(description="weights location")
    model_type: str = Field("inpaint", description="IOPaint's model kind; 'inpaint' = erase model")
    need_prompt: bool = Field(False, description="the model takes no text prompt")
    controlnets: list[str] = Field([], description="none")
    brushnets: list[str] = Field([], description="none")
    support_strength: bool = Field(False, description="not exposed through this endpoint")
    support_outpainting: bool = Field(False, description="no outpainting")
    support_controlnet: bool = Field(False, description="no ControlNet")
    support_brushnet: bool = Field(False, description="no BrushNet")
    support_powerpaint_v2: bool = Field(False, description="no PowerPaint")
    support_lcm_lora: bool = Field(False, description="no LCM-LoRA")
    support_freeu: bool = Field(False, description="no FreeU")
    is_single_file_diffusers: bool = Field(False, description="not a diffusers single file")


class IOPaintServerConfig(BaseModel):
    """IOPaint's server-config: one model, no plugins, no file manager, model switching off."""

    plugins: list[dict] = Field([], description="no plugins")
    modelInfos: list[IOPaintModelInfo] = Field(description="the one loaded model")
    removeBGModel: str = Field("", description="no RemoveBG plugin")
    removeBGModels: list[str] = Field([], description="no RemoveBG plugin")
    realesrganModel: str = Field("", description="no RealESRGAN plugin")
    realesrganModels: list[str] = Field([], description="no RealESRGAN plugin")
    interactiveSegModel: str = Field("", description="no interactive segmentation")
    interactiveSegModels: list[str] = Field([], description="no interactive segmentation")
    enableFileManager: bool = Field(False, description="no file manager")
    enableAutoSaving: bool = Field(False, description="results are not saved on the server")
    enableControlnet: bool = Field(False, description="no ControlNet")
    controlnetMethod: str | None = Field(None, description="no ControlNet")
    disableModelSwitch: bool = Field(True, description="one model per server")
    isDesktop: bool = Field(False, description="not the desktop build")
    samplers: list[str] = Field(["ddim"], description="the recipe's DDIM")
