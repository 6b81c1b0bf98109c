"""The HTTP service: `create_app(load_pipeline, ServerConfig(...))` -> a FastAPI app.

Endpoints: `POST /v1/inpaint` (multipart; `Accept: text/event-stream` streams step progress),
`GET /v1/health`, `GET /v1/info`, the IOPaint-compatible `/api/v1/*` (moebius.server.iopaint),
OpenAPI docs at `/docs` and the web page at `/`. The model loads in a thread at start-up (health
says `loading` meanwhile) and runs on one `InferenceWorker` thread, never on the event loop.
Every error is JSON `{"error", "detail"}` with the status the README lists.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import moebius
from moebius import options as opts
from moebius.server.middleware import Admission, ApiError, ApiKey, UploadLimit, error_response
from moebius.server.schemas import ErrorBody, Health, Info
from moebius.server.uploads import check_pair, decode_image, encode_image
from moebius.server.worker import Cancelled, InferenceWorker, Job, NotReady, QueueFull

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_SEED = 0  # as `moebius inpaint --seed`: the same request gives the same image
INPAINT_PATHS = ("/v1/inpaint", "/api/v1/inpaint")  # admission-checked before the body is read
ERRORS = {  # status -> when, for the OpenAPI docs of the inpaint endpoints
    400: "bad or mismatched input (corrupt image, mask of another size, bad option)",
    401: "missing or wrong API key",
    413: "upload over --max-upload-mb, or more pixels than --max-pixels (checked from the header)",
    415: "a file that is not an image",
    503: "queue full (see Retry-After), model not loaded yet, or shutting down",
    504: "the request did not finish within --timeout seconds",
}
ERROR_RESPONSES = {status: {"model": ErrorBody, "description": d} for status, d in ERRORS.items()}


@dataclass(frozen=True)
class ServerConfig:
    """Limits and identity of one server (the `moebius serve` options)."""

    queue_size: int = 8  # requests that may wait; more are refused with 503
    max_pixels: int = opts.DEFAULT_MAX_PIXELS
    max_upload_mb: float = 50.0
    timeout: float = 600.0  # s from arrival to answer, queueing included
    api_key: str | None = None
    max_batch: int = 4  # requests (and native windows per model call) batched together
    model: str = opts.DEFAULT_MODEL
    variant: str | None = opts.DEFAULT_VARIANT
    weights: str | None = None


# --------------------------------------------------------------------------- running a job
def pipeline_options(**values) -> dict:
    """Given (not None) options, validated with moebius.options; ValueError -> 400."""
    given = {key: value for key, value in values.items() if value is not None}
    try:
        opts.validate(**given)
    except ValueError as err:
        raise ApiError(400, "invalid option", str(err)) from err
    return given


def resolve_seed(seed: int | None) -> int:
    """None -> DEFAULT_SEED, -1 -> a random seed (reported in X-Seed), else as given."""
    if seed is None:
        return DEFAULT_SEED
    if seed == -1:
        return random.SystemRandom().randrange(2**31)
    if not 0 <= seed < 2**63:
        raise ApiError(
            400, "invalid option", f"seed must be -1 (random) or in [0, 2**63), got {seed}"
        )
    return seed


class Service:
    """What the endpoints share: config, worker, the pipeline once loaded."""

    def __init__(self, config: ServerConfig, load_pipeline: Callable):
        self.config, self.load_pipeline = config, load_pipeline
        self.worker = InferenceWorker(config.queue_size, config.max_batch)
        self.loader: threading.Thread | None = None
        self.stopping = False

    def load(self) -> None:
        try:
            pipe = self.load_pipeline()
            pipe.set_progress_bar_config(disable=True)
        except Exception as err:  # reported by /v1/health, requests get 503
            logger.exception("loading the pipeline failed")
            self.worker.load_error = f"loading the model failed: {type(err).__name__}: {err}"
            return
        self.worker.start(pipe)
        logger.info("model ready on %s (%s)", pipe.device, pipe.dtype)

    def retry_after(self) -> str:
        return str(max(1, math.ceil(self.worker.depth * self.worker.seconds_per_job)))

    async def decode_pair(self, image_bytes: bytes, mask_bytes: bytes):
        """(image, mask, input format), or ApiError; decoding runs off the event loop."""
        self.check_ready()
        limit = self.config.max_pixels
        image, fmt = await run_in_threadpool(decode_image, image_bytes, "image", limit)
        mask, _ = await run_in_threadpool(decode_image, mask_bytes, "mask", limit)
        check_pair(image, mask)
        return image, mask, fmt

    def check_ready(self) -> None:
        """503 before any decoding when the model is not loaded or the queue is full."""
        if not self.worker.ready:
            raise ApiError(
                503,
                "not ready",
                self.worker.load_error or "the model is loading",
                headers={"Retry-After": "5"},
            )
        if not self.worker.has_room():
            raise ApiError(
                503,
                "queue full",
                f"{self.config.queue_size} requests are waiting; retry after Retry-After seconds",
                {"Retry-After": self.retry_after()},
            )

    async def submit(self, image, mask, options: dict, seed: int) -> Job:
        """Queue a job (503 when full or not ready); its window count is planned off the loop."""
        try:
            windows = await run_in_threadpool(self.worker.count_windows, image, mask, options)
        except NotReady as err:
            raise ApiError(503, "not ready", str(err), {"Retry-After": "5"}) from err
        except ValueError as err:  # e.g. strategy 'native' for an image of another size
            raise ApiError(400, "invalid input", str(err)) from err
        job = Job(image, mask, options, seed, time.monotonic() + self.config.timeout,
                  windows=windows)  # fmt: skip
        try:
            return self.worker.submit(job)
        except QueueFull as err:
            raise ApiError(
                503,
                "queue full",
                f"{err}; retry after Retry-After seconds",
                {"Retry-After": self.retry_after()},
            ) from err
        except NotReady as err:
            raise ApiError(503, "not ready", str(err), {"Retry-After": "5"}) from err

    async def result(self, job: Job) -> Image.Image:
        """Wait for the job until its deadline; the errors of a run as ApiError."""
        try:
            return await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(job.future)), job.deadline - time.monotonic()
            )
        except TimeoutError as err:
            job.abandon()
            raise ApiError(
                504,
                "time limit",
                f"no result within {self.config.timeout:g} s "
                "(--timeout); the server is busy or the image is large",
            ) from err
        except asyncio.CancelledError:
            job.abandon()  # the client went away
            raise
        except (Cancelled, NotReady) as err:
            raise ApiError(503, "not ready", str(err), {"Retry-After": "5"}) from err
        except ValueError as err:  # the pipeline refused the input
            raise ApiError(400, "invalid input", str(err)) from err

    async def answer(self, job: Job, output_format: str) -> Response:
        result = await self.result(job)
        content, media_type = await run_in_threadpool(encode_image, result, output_format)
        headers = {"X-Seed": str(job.seed), "X-Batch-Size": str(job.batch_size)}
        return Response(content, media_type=media_type, headers=headers)

    async def stream(self, job: Job, output_format: str) -> AsyncIterator[str]:
        """Server-sent events: queued, progress (each step), then result (base64) or error."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def put(event) -> None:  # from the worker thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # loop closed: nobody listens any more
                pass

        job.on_progress = lambda progress: put(("progress", progress))
        job.future.add_done_callback(lambda _: put(("done", None)))
        try:
            yield _sse("queued", {"position": self.worker.position(job)})
            while not job.future.done():
                kind, data = await events.get()
                if kind == "progress":
                    yield _sse("progress", data)
            try:
                response = await self.answer(job, output_format)
            except ApiError as err:
                yield _sse(
                    "error", {"status": err.status, "error": err.error, "detail": err.detail}
                )
                return
            yield _sse(
                "result",
                {
                    "seed": job.seed,
                    "batch_size": job.batch_size,
                    "media_type": response.media_type,
                    "image": base64.b64encode(response.body).decode("ascii"),
                },
            )
        finally:
            if not job.future.done():
                job.abandon()


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


# --------------------------------------------------------------------------- the app
def create_app(load_pipeline: Callable, config: ServerConfig = ServerConfig()) -> FastAPI:
    """The FastAPI app; `load_pipeline()` -> InpaintPipeline runs in a thread at start-up."""
    service = Service(config, load_pipeline)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.loader = threading.Thread(target=service.load, name="moebius-load", daemon=True)
        service.loader.start()
        yield
        service.stopping = True
        service.loader.join(timeout=config.timeout)
        await run_in_threadpool(service.worker.stop)

    app = FastAPI(
        title="moebius-inpaint",
        version=moebius.__version__,
        description="Remove objects from photos with the Moebius inpainting model. Errors are JSON "
        '`{"error", "detail"}`. With --api-key, every /v1 and /api call needs '
        "`Authorization: Bearer KEY` (or `X-API-Key: KEY`).",
        lifespan=lifespan,
    )
    app.state.service = service
    app.openapi = lambda: _openapi(app)
    _install_error_handlers(app)

    @app.post(
        "/v1/inpaint",
        responses={
            200: {
                "content": {"image/png": {}, "text/event-stream": {}},
                "description": "the result, same size and mode as the input; X-Seed "
                "header. With Accept: text/event-stream: events queued, progress, "
                "result (base64 image) or error.",
            },
            **ERROR_RESPONSES,
        },
        summary="Fill the white part of the mask",
    )
    async def inpaint(
        request: Request,
        image: Annotated[UploadFile, File(description="the photo (PNG, JPEG, WebP, ...)")],
        mask: Annotated[
            UploadFile, File(description="mask of the image's size, white (255) = fill")
        ],
        steps: Annotated[int | None, Form(description="DDIM steps (default 20)")] = None,
        guidance_scale: Annotated[float | None, Form(description="guidance scale (2.5)")] = None,
        seed: Annotated[int | None, Form(description="noise seed; -1 = random; default 0")] = None,
        strategy: Annotated[str | None, Form(description="auto, native, crop or resize")] = None,
        margin: Annotated[int | None, Form(description="context px around a crop region")] = None,
        mask_dilation: Annotated[int | None, Form(description="grow the mask by N px (0)")] = None,
        task: Annotated[str | None, Form(description="remove (default) or object")] = None,
        output_format: Annotated[
            Literal["png", "jpeg", "webp"], Form(description="format of the answer (png)")
        ] = "png",
    ):
        service.check_ready()
        options = pipeline_options(
            steps=steps,
            guidance_scale=guidance_scale,
            strategy=strategy,
            margin=margin,
            mask_dilation=mask_dilation,
            task=task,
        )
        the_seed = resolve_seed(seed)
        image_pil, mask_pil, _ = await service.decode_pair(await image.read(), await mask.read())
        job = await service.submit(image_pil, mask_pil, options, the_seed)
        if "text/event-stream" in request.headers.get("accept", ""):
            return StreamingResponse(
                service.stream(job, output_format), media_type="text/event-stream"
            )
        return await service.answer(job, output_format)

    @app.get("/v1/health", response_model=Health, summary="loading / ready, queue depth")
    async def health() -> Health:
        worker = service.worker
        status = "ready" if worker.ready else "error" if worker.load_error else "loading"
        status = "stopping" if service.stopping else status
        return Health(
            status=status,
            queue_depth=worker.depth,
            queue_size=config.queue_size,
            detail=worker.load_error,
        )

    @app.get("/v1/info", response_model=Info, summary="model, device, dtype, defaults, limits")
    async def info() -> Info:
        return _info(service)

    from moebius.server.iopaint import router as iopaint_router

    app.include_router(iopaint_router)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # The last added runs first: API key, then admission, then the upload limit.
    app.add_middleware(UploadLimit, max_bytes=int(config.max_upload_mb * 2**20))
    app.add_middleware(Admission, check=service.check_ready, paths=INPAINT_PATHS)
    app.add_middleware(ApiKey, key=config.api_key)
    return app


def _info(service: Service) -> Info:
    from moebius import strategies
    from moebius.recipe import Recipe

    pipe, config = service.worker.pipe, service.config
    defaults = {
        "steps": Recipe.steps,
        "strength": Recipe.strength,
        "guidance_scale": Recipe.guidance_scale,
        "strategy": "auto",
        "margin": strategies.DEFAULT_MARGIN,
        "mask_dilation": 0,
        "task": Recipe.task,
        "seed": DEFAULT_SEED,
        "output_format": "png",
    }
    limits = {
        k: v
        for k, v in asdict(config).items()
        if k in ("queue_size", "max_pixels", "max_upload_mb", "timeout", "max_batch")
    }
    return Info(
        version=moebius.__version__,
        model=config.model,
        variant=config.variant,
        weights=config.weights,
        device=str(pipe.device) if pipe else None,
        dtype=str(pipe.dtype).removeprefix("torch.") if pipe else None,
        native_size=pipe.native_size if pipe else None,
        defaults=defaults,
        limits=limits,
    )


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema without its 422 answers: invalid requests get 400 here (ErrorBody)."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(
            title=app.title, version=app.version, routes=app.routes, description=app.description
        )
        for operations in schema["paths"].values():
            for operation in operations.values():
                if operation.get("responses", {}).pop("422", None) is not None:
                    operation["responses"].setdefault(
                        "400",
                        ERROR_RESPONSES[400]
                        | {
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/ErrorBody"}
                                }
                            }
                        },
                    )
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def apierror_response(request, err: ApiError):
        return error_response(err.status, err.error, err.detail, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        problems = [
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
            for e in err.errors()
        ]
        return error_response(400, "invalid request", "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def httperror_response(request, err: StarletteHTTPException):
        from http import HTTPStatus

        return error_response(
            err.status_code,
            HTTPStatus(err.status_code).phrase.lower(),
            str(err.detail),
            getattr(err, "headers", None),
        )

    @app.exception_handler(Exception)
    async def internal(request, err: Exception):  # a bug: logged, never a traceback to the client
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(
            500, "internal error", "the server failed on this request; see its log"
        )
