"""One inference thread in front of the pipeline: a bounded queue, batching, deadlines, cancel.

The event loop never runs the model. Requests become `Job`s in a bounded queue (a full queue is
refused at once, so memory stays bounded); one worker thread takes the oldest job plus queued jobs
with the same options, as long as their native-size windows fit one model batch (`max_batch`),
and calls `pipe(images, masks, noise=...)` once. Each job's share of `noise` is drawn from its own
seed exactly as a lone `pipe(image, mask, generator=seed)` call draws it, so batching never
changes a result: `X-Seed` reproduces it. A job with more windows than a batch runs alone.
The pipeline's step `callback` reports progress and is where a run stops early: when every job of
the batch has been abandoned (its client timed out or left) or the server shuts down.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

logger = logging.getLogger(__name__)

ProgressFn = Callable[[dict], None]  # called from the worker thread with {"step", "steps", "run"}


class QueueFull(Exception):
    """The queue holds `queue_size` waiting jobs; the client should retry later (HTTP 503)."""


class NotReady(Exception):
    """The model is still loading, failed to load, or the server is shutting down (HTTP 503)."""


class Cancelled(Exception):
    """A run stopped early because nobody waits for its result any more, or the server stops."""


@dataclass(eq=False)
class Job:
    """One request: an image and its mask, pipeline keyword options, the seed and a deadline."""

    image: Image.Image
    mask: Image.Image
    options: dict  # keywords of InpaintPipeline.__call__ (steps, guidance_scale, strategy, ...)
    seed: int
    deadline: float  # time.monotonic() after which nobody waits for the result
    on_progress: ProgressFn | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    abandoned: bool = False  # set by the client side on time-out or disconnect
    batch_size: int = 0  # how many jobs shared the pipeline call (set when it starts)
    windows: int = 1  # native-size windows the pipeline runs for it (`count_windows`)

    @property
    def batch_key(self) -> tuple:
        """Jobs with equal keys can share one pipeline call (the same options)."""
        return tuple(sorted(self.options.items()))

    def abandon(self) -> None:
        """The client stopped waiting: drop the job if queued, stop its run if it runs alone."""
        self.abandoned = True
        self.future.cancel()  # only succeeds while queued


class InferenceWorker:
    """A thread that runs queued jobs through `pipe`; `submit` refuses beyond `queue_size`."""

    def __init__(self, queue_size: int = 8, max_batch: int = 4):
        if queue_size < 1 or max_batch < 1:
            raise ValueError(
                f"queue_size and max_batch must be >= 1, got {queue_size}, {max_batch}"
            )
        self.queue_size, self.max_batch = queue_size, max_batch
        self.pipe = None  # set by `start`, after the model has loaded
        self.load_error: str | None = None
        self._jobs: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.seconds_per_job = 1.0  # of the last run; for Retry-After

    # ------------------------------------------------------------------------------ state
    @property
    def ready(self) -> bool:
        return self.pipe is not None and not self._stopping

    @property
    def depth(self) -> int:
        """Jobs waiting plus jobs running."""
        with self._cond:
            return len(self._jobs) + len(self._running)

    @property
    def alive(self) -> bool:
        """The inference thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def has_room(self) -> bool:
        with self._cond:
            return len(self._jobs) < self.queue_size

    def position(self, job: Job) -> int:
        """0 while running, else 1 + the number of jobs ahead of it in the queue."""
        with self._cond:
            return self._jobs.index(job) + 1 if job in self._jobs else 0

    # ------------------------------------------------------------------------------ lifecycle
    def start(self, pipe) -> None:
        """Begin serving with a loaded pipeline."""
        self.pipe = pipe
        self._thread = threading.Thread(target=self._loop, name="moebius-inference", daemon=False)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, fail the queued ones, stop the running batch at its next step, join."""
        with self._cond:
            self._stopping = True
            queued, self._jobs = list(self._jobs), deque()
            self._cond.notify_all()
        for job in queued:
            _set_exception(job, NotReady("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("inference thread still running after %.0f s", timeout)

    def submit(self, job: Job) -> Job:
        """Queue `job`; raises NotReady (loading / stopping) or QueueFull at once."""
        with self._cond:
            if self._stopping:
                raise NotReady("the server is shutting down")
            if self.pipe is None:
                raise NotReady(self.load_error or "the model is still loading; retry shortly")
            if len(self._jobs) >= self.queue_size:
                raise QueueFull(f"{len(self._jobs)} requests are already waiting")
            self._jobs.append(job)
            self._cond.notify()
        return job

    def count_windows(self, image: Image.Image, mask: Image.Image, options: dict) -> int:
        """Native-size windows `pipe` will run for this pair (the pipeline's mask rule and plan)."""
        from moebius import masks, strategies

        if self.pipe is None:
            raise NotReady(self.load_error or "the model is still loading; retry shortly")
        fill = masks.prepare_mask(mask, image.size, dilation=options.get("mask_dilation", 0))
        strategy = options.get("strategy", "auto")
        margin = options.get("margin", strategies.DEFAULT_MARGIN)
        return len(strategies.plan(fill, self.pipe.native_size, strategy, margin))

    # ------------------------------------------------------------------------------ the thread
    def _take_batch(self) -> list[Job] | None:
        """Wait for the oldest job, then take the queued jobs it can share a call with."""
        with self._cond:
            while not self._jobs and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._jobs.popleft()
            batch, windows = [first], first.windows
            for job in list(self._jobs):
                fits = windows + job.windows <= self.max_batch and len(batch) < self.max_batch
                if fits and job.batch_key == first.batch_key:
                    self._jobs.remove(job)
                    batch.append(job)
                    windows += job.windows
            # A job abandoned while queued was cancelled: it is not run.
            batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
            self._running = batch
            return batch

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            try:
                if batch:
                    self._run(batch)
            finally:
                with self._cond:
                    self._running = []

    def _run(self, batch: list[Job]) -> None:
        first = batch[0]
        for job in batch:
            job.batch_size = len(batch)
        steps = _steps_per_run(first.options)
        runs = 0

        def callback(i: int, t, latents) -> None:
            nonlocal runs
            if self._stopping or all(job.abandoned for job in batch):
                raise Cancelled("stopped: no client waits for this run")
            runs += i == 0
            event = {"step": i + 1, "steps": steps, "run": runs}
            for job in batch:
                if job.on_progress is not None and not job.abandoned:
                    job.on_progress(event)

        started = time.monotonic()
        try:
            results = self.pipe(
                [job.image for job in batch],
                [job.mask for job in batch],
                **first.options,
                **self._noise(batch),
                callback=callback,
            )
        except Exception as err:  # handed to every waiting client; the thread lives on
            if not isinstance(err, Cancelled | ValueError):
                logger.exception("inference failed")
            for job in batch:
                _set_exception(job, err)
            return
        elapsed = time.monotonic() - started
        self.seconds_per_job = elapsed / len(batch)
        logger.info("ran %d job(s) in %.2f s", len(batch), elapsed)
        for job, result in zip(batch, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)

    def _noise(self, batch: list[Job]) -> dict:
        """Pipeline keywords for the noise: every job's draws from its own seed, in one batch.

        A lone `pipe(..., generator=seed, batch_size=max_batch)` with k <= max_batch windows draws
        the four tensors of one batch of k; concatenating those per job (in the pipeline's window
        order: image by image) gives every job the noise it would get alone. A job with more
        windows than a batch runs alone with its generator.
        """
        if (
            len(batch) == 1
            and batch[0].windows > self.max_batch
            or not any(job.windows for job in batch)
        ):
            generator = torch.Generator().manual_seed(batch[0].seed)
            return {"generator": generator, "batch_size": self.max_batch}
        draws = [
            self.pipe.draw_noise(job.windows, generator=torch.Generator().manual_seed(job.seed))
            for job in batch
            if job.windows
        ]
        return {"noise": {key: torch.cat([d[key] for d in draws]) for key in draws[0]}}


def _steps_per_run(options: dict) -> int:
    """Model calls per denoising run: int(steps * strength) (pipeline defaults when unset)."""
    from moebius.recipe import Recipe

    steps = options.get("steps", Recipe.steps)
    return max(1, int(steps * options.get("strength", Recipe.strength)))


def _set_exception(job: Job, err: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(err)
