"""HTTP API of `moebius serve` with a tiny random-weight pipeline: answers, errors, limits, queue.

Every error status comes from a real malformed request; answers are checked pixel by pixel.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
import torch
from conftest import far_from_mask, tiny_pipeline
from fastapi.testclient import TestClient
from PIL import Image
from server_helpers import ServerThread, png_bytes, stroke_mask

from moebius import cli
from moebius.server.app import ServerConfig, create_app
from moebius.server.cli import is_loopback
from moebius.server.iopaint import iopaint_strategy
from moebius.server.schemas import IOPaintInpaintRequest
from moebius.server.worker import InferenceWorker, Job

STEPS = {"steps": "4"}  # 3 model calls per run keep the tests fast
SIZE = (200, 150)  # W, H: non-square, above the tiny model's native 128 px
BOX = (60, 40, 110, 90)  # the hole, (x0, y0, x1, y1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is fastest on one thread of a busy machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def wait_ready(client, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/v1/health").json()["status"] != "ready":
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def client(pipe):
    app = create_app(lambda: pipe, ServerConfig(queue_size=4, max_upload_mb=1, max_pixels=10**6))
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def photo(mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (SIZE[1], SIZE[0], len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


def files(image: Image.Image | bytes, mask: Image.Image | bytes | None = None) -> dict:
    image = image if isinstance(image, bytes) else png_bytes(image)
    mask = png_bytes(stroke_mask(SIZE, BOX)) if mask is None else mask
    mask = mask if isinstance(mask, bytes) else png_bytes(mask)
    return {"image": ("image.png", image), "mask": ("mask.png", mask)}


def check_inpainted(before: Image.Image, response: httpx.Response, native: int = 128) -> None:
    """Same size and mode; outside the hole and its feather identical; inside changed."""
    assert response.status_code == 200, response.text
    after = Image.open(io.BytesIO(response.content))
    assert after.size == before.size and after.mode == before.mode
    a, b = np.asarray(after), np.asarray(before)
    fill = np.asarray(stroke_mask(before.size, BOX)) > 0
    outside = far_from_mask(fill, native)
    np.testing.assert_array_equal(a[outside], b[outside])
    changed = a != b if a.ndim == 2 else (a[..., :3] != b[..., :3]).any(axis=-1)
    assert changed[fill].mean() > 0.9


# --------------------------------------------------------------------------- answers
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_inpaint_keeps_size_and_mode(client, mode):
    image = photo(mode)
    response = client.post("/v1/inpaint", files=files(image), data=STEPS)
    check_inpainted(image, response)
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "0"
    if mode == "RGBA":  # the alpha channel comes back untouched
        out = Image.open(io.BytesIO(response.content))
        np.testing.assert_array_equal(np.asarray(out)[..., 3], np.asarray(image)[..., 3])


def test_seed_reproduces_and_random_seed_is_reported(client):
    image = photo()
    first = client.post("/v1/inpaint", files=files(image), data={**STEPS, "seed": "7"})
    again = client.post("/v1/inpaint", files=files(image), data={**STEPS, "seed": "7"})
    other = client.post("/v1/inpaint", files=files(image), data={**STEPS, "seed": "8"})
    assert first.headers["x-seed"] == "7" and first.content == again.content
    assert other.content != first.content
    rand = client.post("/v1/inpaint", files=files(image), data={**STEPS, "seed": "-1"})
    seed = int(rand.headers["x-seed"])
    replay = client.post("/v1/inpaint", files=files(image), data={**STEPS, "seed": str(seed)})
    assert 0 <= seed < 2**31 and replay.content == rand.content


def test_options_reach_the_pipeline(client):
    image = photo()
    plain = client.post("/v1/inpaint", files=files(image), data=STEPS)
    grown = client.post("/v1/inpaint", files=files(image), data={**STEPS, "mask_dilation": "6"})
    a, b = (np.asarray(Image.open(io.BytesIO(r.content))) for r in (plain, grown))
    src = np.asarray(image)
    x0, y0, x1, y1 = BOX
    ring = (slice(y0 - 5, y0 - 1), slice(x0, x1))  # inside the dilation, outside the stroke
    assert (b[ring] != src[ring]).any(axis=-1).mean() > 0.9
    assert (a[ring] != b[ring]).any()
    for fmt, media in [("jpeg", "image/jpeg"), ("webp", "image/webp")]:
        response = client.post(
            "/v1/inpaint", files=files(image), data={**STEPS, "output_format": fmt}
        )
        assert response.headers["content-type"] == media
        assert Image.open(io.BytesIO(response.content)).size == SIZE


def test_progress_stream(client):
    image = photo()
    with client.stream(
        "POST", "/v1/inpaint", files=files(image), data=STEPS,
        headers={"Accept": "text/event-stream"},
    ) as response:  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    events = [
        (block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1][6:]))
        for block in text.strip().split("\n\n")
    ]
    names = [name for name, _ in events]
    assert names == ["queued", "progress", "progress", "progress", "result"]
    assert [data["step"] for name, data in events if name == "progress"] == [1, 2, 3]
    assert all(data["steps"] == 3 for name, data in events if name == "progress")
    result = events[-1][1]
    assert result["seed"] == 0 and result["media_type"] == "image/png"
    plain = client.post("/v1/inpaint", files=files(image), data=STEPS)
    assert base64.b64decode(result["image"]) == plain.content  # the same image either way


def test_health_and_info(client):
    health = client.get("/v1/health").json()
    assert health == {"status": "ready", "queue_depth": 0, "queue_size": 4, "detail": None}
    info = client.get("/v1/info").json()
    assert info["native_size"] == 128 and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["defaults"]["steps"] == 20 and info["defaults"]["guidance_scale"] == 2.5
    assert info["limits"]["queue_size"] == 4 and info["limits"]["max_pixels"] == 10**6
    docs = client.get("/openapi.json").json()
    schemas = docs["components"]["schemas"]
    assert "Body_inpaint_v1_inpaint_post" in schemas and "IOPaintInpaintRequest" in schemas
    undocumented = [(name, field) for name, schema in schemas.items()
                    for field, spec in schema.get("properties", {}).items()
                    if not spec.get("description")]  # fmt: skip
    assert undocumented == []  # every field described
    statuses = set(docs["paths"]["/v1/inpaint"]["post"]["responses"])
    assert statuses == {"200", "400", "401", "413", "415", "503", "504"}  # 400, never 422
    assert client.get("/").headers["content-type"].startswith("text/html")
    assert "app.js" in client.get("/").text and client.get("/static/app.js").status_code == 200


# --------------------------------------------------------------------------- IOPaint
def test_iopaint_inpaint(client):
    image = photo()
    body = {
        "image": "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode(),
        "mask": base64.b64encode(png_bytes(stroke_mask(SIZE, BOX))).decode(),
        "hd_strategy": "Crop", "hd_strategy_crop_margin": 32, "hd_strategy_crop_trigger_size": 100,
        "sd_seed": 5, "sd_steps": 4, "sd_guidance_scale": 2.0,
        "prompt": "ignored", "sd_sampler": "UniPC", "enable_controlnet": False,  # IOPaint's extras
    }  # fmt: skip
    response = client.post("/api/v1/inpaint", json=body)
    check_inpainted(image, response)
    assert response.headers["x-seed"] == "5" and response.headers["content-type"] == "image/png"
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG", quality=95)
    body["image"] = base64.b64encode(jpeg.getvalue()).decode()
    response = client.post("/api/v1/inpaint", json=body)
    assert response.headers["content-type"] == "image/jpeg"  # answered in the input's format
    assert Image.open(io.BytesIO(response.content)).size == SIZE


def test_iopaint_strategy_mapping():
    def strategy(size, **fields):
        return iopaint_strategy(IOPaintInpaintRequest(image="x", mask="x", **fields), size)

    assert strategy((2000, 1000)) == {"strategy": "crop", "margin": 128}  # IOPaint's defaults
    assert strategy((700, 500)) == {"strategy": "auto"}  # under the 800 px trigger
    assert strategy((2000, 1000), hd_strategy="Resize") == {"strategy": "resize"}
    assert strategy((1000, 800), hd_strategy="Resize") == {"strategy": "auto"}  # under 1280
    assert strategy((2000, 1000), hd_strategy="Original") == {"strategy": "auto"}


def test_iopaint_server_config_and_model(client):
    config = client.get("/api/v1/server-config").json()
    for key in ("plugins", "modelInfos", "enableFileManager", "disableModelSwitch", "samplers"):
        assert key in config
    assert config["plugins"] == [] and config["disableModelSwitch"] is True
    model = client.get("/api/v1/model").json()
    assert model == config["modelInfos"][0]
    assert model["name"] == "moebius-ft_places2" and model["model_type"] == "inpaint"


# --------------------------------------------------------------------------- errors
def _png_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR claims `width` x `height` (a decompression bomb header)."""
    data = bytearray(png_bytes(Image.new("L", (8, 8))))
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def _bad_requests():
    good = png_bytes(photo())
    return {
        "truncated png": (files(good[: len(good) // 2]), 400, "corrupt image"),
        "text file": (files(b"hello, this is text\n" * 10), 415, "not an image"),
        "1x1 image": (files(Image.new("RGB", (1, 1)), Image.new("L", (1, 1))), 400, "too small"),
        "mask of another size": (files(good, Image.new("L", (100, 100))), 400, "mask size"),
        "30000x30000 header": (files(_png_claiming(30000, 30000)), 413, "image too large"),
        "oversized upload": (files(good + b"\0" * 2**20), 413, "upload too large"),
        "missing mask": ({"image": ("image.png", good)}, 400, "invalid request"),
        "empty mask file": (files(good, b""), 400, "empty upload"),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_error_statuses(client, case):
    upload, status, error = _bad_requests()[case]
    response = client.post("/v1/inpaint", files=upload, data=STEPS)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and error in body["error"] and body["detail"]
    assert "Traceback" not in response.text


def test_chunked_upload_over_the_limit_is_413(client):
    def chunks():  # no Content-Length: the limit is counted while reading
        for _ in range(40):
            yield b"\0" * 32768  # 1.25 MB in all, over the 1 MB limit

    response = client.post("/v1/inpaint", content=chunks(),
                           headers={"content-type": "multipart/form-data; boundary=x"})  # fmt: skip
    assert response.status_code == 413 and response.json()["error"] == "upload too large"


@pytest.mark.parametrize(
    "options, word",
    [({"steps": "0"}, "steps"), ({"strategy": "bogus"}, "strategy"), ({"task": "paint"}, "task"),
     ({"guidance_scale": "nan"}, "guidance"), ({"mask_dilation": "-1"}, "mask_dilation"),
     ({"steps": "four"}, "steps"), ({"output_format": "gif"}, "output_format")],
)  # fmt: skip
def test_bad_options_are_400(client, options, word):
    response = client.post("/v1/inpaint", files=files(photo()), data=options)
    assert response.status_code == 400 and word in response.json()["detail"]


def test_iopaint_errors(client):
    good = base64.b64encode(png_bytes(photo())).decode()
    mask = base64.b64encode(png_bytes(stroke_mask(SIZE, BOX))).decode()
    cases = [
        ({"image": "not base64!", "mask": mask}, 400),
        ({"image": good}, 400),  # no mask
        ({"image": good, "mask": base64.b64encode(b"text").decode()}, 415),
        ({"image": good, "mask": mask, "hd_strategy": "Tile"}, 400),
    ]
    for body, status in cases:
        response = client.post("/api/v1/inpaint", json=body)
        assert response.status_code == status, (body.keys(), response.text)
        assert set(response.json()) == {"error", "detail"}
    response = client.post(
        "/api/v1/inpaint", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400


def test_api_key(pipe):
    app = create_app(lambda: pipe, ServerConfig(api_key="s3cret"))
    with TestClient(app) as c:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cret2"}]:
            response = c.get("/v1/health", headers=headers)
            assert response.status_code == 401 and response.json()["error"] == "unauthorized"
            response = c.post("/v1/inpaint", files=files(photo()), headers=headers)
            assert response.status_code == 401
            assert c.get("/api/v1/server-config", headers=headers).status_code == 401
        assert c.get("/v1/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/v1/health", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/").status_code == 200  # the page itself holds no data


def test_not_loaded_is_503(pipe):
    gate = threading.Event()

    def slow_load():
        gate.wait(30)
        return pipe

    with TestClient(create_app(slow_load)) as c:
        assert c.get("/v1/health").json()["status"] == "loading"
        response = c.post("/v1/inpaint", files=files(photo()), data=STEPS)
        assert response.status_code == 503 and "retry-after" in response.headers
        gate.set()
        wait_ready(c)

    def broken_load():
        raise FileNotFoundError("no weights in /nowhere")

    with TestClient(create_app(broken_load)) as c:
        deadline = time.monotonic() + 10
        while (health := c.get("/v1/health").json())["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert health["status"] == "error" and "/nowhere" in health["detail"]
        response = c.post("/v1/inpaint", files=files(photo()), data=STEPS)
        assert response.status_code == 503 and "/nowhere" in response.json()["detail"]


# --------------------------------------------------------------------------- queue, batching
class Gated:
    """The pipeline behind a gate; records the batch sizes and the denoising steps run."""

    def __init__(self, pipe):
        self.pipe, self.gate, self.entered = pipe, threading.Event(), threading.Event()
        self.batches, self.steps_run = [], 0

    def __call__(self, images, masks, callback=None, **kwargs):
        self.batches.append(len(images))
        self.entered.set()
        assert self.gate.wait(60)

        def counting(i, t, x):
            self.steps_run += 1
            callback(i, t, x)

        return self.pipe(images, masks, callback=counting, **kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def post_in_thread(url: str, upload: dict, results: list, data=None) -> threading.Thread:
    data = STEPS if data is None else data

    def post():
        results.append(httpx.post(f"{url}/v1/inpaint", files=upload, data=data, timeout=120))

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def wait_depth(url: str, depth: int) -> None:
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/v1/health").json()["queue_depth"] != depth:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_queue_full_503_and_batching(pipe):
    gated = Gated(pipe)
    app = create_app(lambda: gated, ServerConfig(queue_size=2, max_batch=4))
    image = photo()
    with ServerThread(app) as server:
        wait_ready(httpx.Client(base_url=server.url))
        results = []
        threads = [post_in_thread(server.url, files(image), results)]
        assert gated.entered.wait(30)  # the first request runs (held at the gate)
        threads += [post_in_thread(server.url, files(image), results, {**STEPS, "seed": str(s)})
                    for s in (11, 12)]  # fmt: skip
        wait_depth(server.url, 3)  # 1 running + 2 waiting = queue full
        full = httpx.post(f"{server.url}/v1/inpaint", files=files(image), data=STEPS)
        assert full.status_code == 503 and full.json()["error"] == "queue full"
        assert int(full.headers["retry-after"]) >= 1
        gated.gate.set()
        for thread in threads:
            thread.join(60)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert gated.batches == [1, 2]  # the two waiting requests shared one pipeline call
    assert sorted(r.headers["x-batch-size"] for r in results) == ["1", "2", "2"]
    # Each answer is what the pipeline gives for its seed alone (per-job noise; batching changes
    # nothing but float rounding of batched kernels: at most 1 level on a few pixels).
    for response in results:
        check_inpainted(image, response)
        seed = int(response.headers["x-seed"])
        alone = pipe(
            image, stroke_mask(SIZE, BOX), steps=4, generator=torch.Generator().manual_seed(seed)
        )
        diff = np.abs(
            np.asarray(Image.open(io.BytesIO(response.content)), int) - np.asarray(alone, int)
        )
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert sorted(int(r.headers["x-seed"]) for r in results) == [0, 11, 12]


def test_many_windows_run_alone(pipe):
    worker = InferenceWorker(queue_size=2, max_batch=4)
    worker.pipe = pipe
    image = Image.new("RGB", (1000, 200))
    mask = np.zeros((200, 1000), np.uint8)
    mask[90:110, 10:990:100] = 255  # 10 dots 100 px apart, with margin 0: windows of 1-2 dots
    options = {"strategy": "crop", "margin": 0}
    windows = worker.count_windows(image, Image.fromarray(mask), options)
    assert windows > worker.max_batch
    job = Job(image, Image.fromarray(mask), options, seed=3, deadline=0, windows=windows)
    assert set(worker._noise([job])) == {"generator", "batch_size"}  # chunks of 4, as alone
    small = Job(image, Image.fromarray(mask), options, seed=3, deadline=0, windows=2)
    noise = worker._noise([small, small])["noise"]
    assert noise["latent"].shape[0] == 4 and noise["latent_offset"].shape[0] == 4


def test_time_limit_504_stops_the_run(pipe):
    gated = Gated(pipe)
    app = create_app(lambda: gated, ServerConfig(timeout=1.0))
    with ServerThread(app) as server:
        wait_ready(httpx.Client(base_url=server.url))
        started = time.monotonic()
        response = httpx.post(f"{server.url}/v1/inpaint", files=files(photo()),
                              data={"steps": "20"}, timeout=60)  # fmt: skip
        assert response.status_code == 504 and response.json()["error"] == "time limit"
        assert time.monotonic() - started < 10
        gated.gate.set()  # the run starts now, nobody waits: it stops at its first step
        wait_depth(server.url, 0)
    assert gated.steps_run == 1  # of 19


def test_graceful_shutdown_finishes_in_flight(pipe):
    gated = Gated(pipe)
    app = create_app(lambda: gated, ServerConfig())
    image = photo()
    server = ServerThread(app).__enter__()
    wait_ready(httpx.Client(base_url=server.url))
    results = []
    thread = post_in_thread(server.url, files(image), results)
    assert gated.entered.wait(30)
    server.server.should_exit = True  # what SIGINT / SIGTERM do
    threading.Timer(0.5, gated.gate.set).start()
    thread.join(60)
    server.__exit__(None, None, None)
    assert not server.thread.is_alive()
    check_inpainted(image, results[0])  # the in-flight request was answered
    service = app.state.service
    assert not service.worker.alive and not service.loader.is_alive()  # no orphan threads


# --------------------------------------------------------------------------- command line
def test_serve_refuses_open_bind_without_key(capsys, monkeypatch):
    monkeypatch.delenv("MOEBIUS_API_KEY", raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0", "--weights", "/nowhere"]) == 2
    assert "--api-key" in capsys.readouterr().err
    monkeypatch.setenv("MOEBIUS_API_KEY", "s3cret")  # with a key it gets as far as the weights
    assert cli.main(["serve", "--host", "0.0.0.0", "--weights", "/nowhere"]) == 2
    err = capsys.readouterr().err
    assert "/nowhere" in err and "--api-key" not in err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert not is_loopback("example.com")
