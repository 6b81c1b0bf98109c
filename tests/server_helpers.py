"""Helpers of the server tests: a saved tiny pipeline, test uploads, a server on a loopback port.

Not a test file: test_server_*.py import it, and bench/server_load.py (--tiny, far_from_mask).
"""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
from conftest import far_from_mask, tiny_pipeline  # noqa: F401 (re-exported for the bench)
from PIL import Image


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
