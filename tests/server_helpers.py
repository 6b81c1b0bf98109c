"""Helpers of the server tests: a tiny random-weight pipeline and a server on a free loopback port.

Not a test file: test_server_*.py import it (and bench/server_load.py --tiny).
"""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image

from moebius.models import MoebiusConfig, MoebiusUNet
from moebius.pipeline import InpaintPipeline


def tiny_pipeline(seed: int = 0) -> InpaintPipeline:
    """Tiny student (16x16 latent) + a ~67k-parameter VAE: native size 128 px, random weights."""
    with torch.random.fork_rng():  # diffusers initialises from the global RNG; keep it local
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            block_out_channels=(8, 8, 16, 16),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=128,
            scaling_factor=0.13025,
        )
        pipe = InpaintPipeline(MoebiusUNet(MoebiusConfig.tiny()), vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(directory: Path, seed: int = 0) -> Path:
    """save_pretrained of the tiny pipeline: a weights folder for `moebius serve --weights`."""
    return tiny_pipeline(seed).save_pretrained(directory)


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kwargs.pop("format", "PNG"), **kwargs)
    return buffer.getvalue()


def stroke_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """'L' mask of `size` (W, H), white inside box (x0, y0, x1, y1)."""
    mask = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    return Image.fromarray(mask)


def near_mask(fill: np.ndarray, reach: int) -> np.ndarray:
    """bool [H, W]: within Chebyshev distance `reach` of a fill pixel (a square dilation)."""
    t = torch.from_numpy(fill.astype(np.float32))[None, None]
    grown = torch.nn.functional.max_pool2d(t, 2 * reach + 1, stride=1, padding=reach)
    return grown[0, 0].numpy() > 0


def feather_reach(image_size: tuple[int, int], native: int) -> int:
    """Widest feather any strategy can leave around the mask (README: 'Any image size').

    The paste-back blur has radius 3 px at the native size, scaled by window side / native; a
    window is at most the image's longest side, and PIL's blur reaches 3 * radius + 2 px.
    """
    return int(np.ceil(3 * 3 * max(image_size) / native)) + 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a thread; a context manager."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
