"""IOPaint-compatible endpoints, so IOPaint's clients (and its web UI) can use this server.

`POST /api/v1/inpaint` takes IOPaint's JSON body and answers like IOPaint: the raw image bytes in
the input's format with an `X-Seed` header. Its HD strategy fields map onto ours as follows
(our model runs at one native size, so "the whole image at full size" is not an option):

    hd_strategy  longest side                    our strategy
    Crop         > hd_strategy_crop_trigger_size  crop, margin = hd_strategy_crop_margin
    Resize       > hd_strategy_resize_limit       resize (to the native size, then pasted back)
    any other case                                auto (native size whole, else crop)

`sd_seed` (-1 = random), `sd_steps` and `sd_guidance_scale` map to seed, steps, guidance_scale;
every other IOPaint field (prompt, sampler, controlnet, ...) is accepted and ignored.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from moebius.server.app import ERROR_RESPONSES, pipeline_options, resolve_seed
from moebius.server.schemas import IOPaintInpaintRequest, IOPaintModelInfo, IOPaintServerConfig
from moebius.server.uploads import decode_base64

router = APIRouter(prefix="/api/v1", tags=["IOPaint-compatible"])


def iopaint_strategy(req: IOPaintInpaintRequest, size: tuple[int, int]) -> dict:
    """IOPaint's hd_strategy fields + the image size -> our strategy (and margin) options."""
    longest = max(size)
    if req.hd_strategy == "Crop" and longest > req.hd_strategy_crop_trigger_size:
        return {"strategy": "crop", "margin": req.hd_strategy_crop_margin}
    if req.hd_strategy == "Resize" and longest > req.hd_strategy_resize_limit:
        return {"strategy": "resize"}
    return {"strategy": "auto"}


@router.post(
    "/inpaint",
    summary="IOPaint's inpaint: JSON in, raw image bytes out (X-Seed)",
    responses={
        200: {
            "content": {"image/png": {}, "image/jpeg": {}},
            "description": "the result in the input's format",
        },
        **ERROR_RESPONSES,
    },
)
async def inpaint(req: IOPaintInpaintRequest, request: Request):
    service = request.app.state.service
    service.check_ready()
    image, mask, fmt = await service.decode_pair(
        decode_base64(req.image, "image"), decode_base64(req.mask, "mask")
    )
    options = pipeline_options(
        steps=req.sd_steps,
        guidance_scale=req.sd_guidance_scale,
        **iopaint_strategy(req, image.size),
    )
    job = await service.submit(image, mask, options, resolve_seed(req.sd_seed))
    return await service.answer(job, fmt)  # in the input's format, as IOPaint answers


def _model_info(request: Request) -> IOPaintModelInfo:
    config = request.app.state.service.config
    name = config.model if config.variant is None else f"{config.model}-{config.variant}"
    return IOPaintModelInfo(name=name, path=config.weights or name)


@router.get("/server-config", response_model=IOPaintServerConfig, summary="IOPaint's server-config")
async def server_config(request: Request) -> IOPaintServerConfig:
    return IOPaintServerConfig(modelInfos=[_model_info(request)])


@router.get("/model", response_model=IOPaintModelInfo, summary="IOPaint's current model")
async def model(request: Request) -> IOPaintModelInfo:
    return _model_info(request)
