"""Load on `moebius serve`: a burst of concurrent requests over loopback from this process.

Starts `moebius serve` as a subprocess (queue size 4 by default), fires N requests at once from N
client threads, polls /v1/health and the server's RSS during the burst, checks every image
answered 200 (same size, pixels outside the mask + feather identical, the hole changed), then
stops the server with SIGTERM (graceful shutdown). Prints JSON: requests/s, p50/p95 latency,
status counts, RSS, health latency, and writes it with --out.

    python bench/server_load.py --tiny --out bench/results/server_load_cpu_tiny.json
    python bench/server_load.py --weights DIR --requests 50 --queue-size 4
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from report import emit, machine_state

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests' helpers: the tiny pipeline, feather geometry
from server_helpers import far_from_mask, free_port, save_tiny_pipeline  # noqa: E402


def rss_mb(pid: int) -> float:
    """Resident set size of a process from /proc (Linux), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_image(size=(640, 427), box=(250, 150, 330, 230), seed=0):
    """A non-square noise photo and its box mask (white = fill) as PNG bytes + arrays."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    fill = np.zeros((size[1], size[0]), bool)
    fill[box[1] : box[3], box[0] : box[2]] = True
    encoded = []
    for array in (image, fill.astype(np.uint8) * 255):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return image, fill, encoded


def start_server(weights: Path, port: int, queue_size: int, threads: int | None, log: Path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "moebius.cli", "serve", "--weights", str(weights),
               "--port", str(port), "--queue-size", str(queue_size)]  # fmt: skip
    with open(log, "wb") as stream:  # a file, not a pipe: a full pipe would block the server
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stream)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).json()["status"] == "ready":
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not become ready within 300 s")


def burst(url: str, n: int, files: dict, data: dict, timeout: float) -> list[dict]:
    """n POSTs released together; one record per request (status, latency, body or error)."""
    records = [{} for _ in range(n)]
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        start = time.perf_counter()
        try:
            r = httpx.post(f"{url}/v1/inpaint", files=files, data=data, timeout=timeout)
            records[i] = {"status": r.status_code, "body": r.content, "headers": r.headers}
        except httpx.HTTPError as err:  # no answer: counted as dropped
            records[i] = {"status": None, "error": f"{type(err).__name__}: {err}"}
        records[i]["latency_s"] = time.perf_counter() - start

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


def watch(url: str, pid: int, stop: threading.Event, out: dict) -> None:
    """Poll /v1/health and the server's RSS every 50 ms until `stop`."""
    latencies, depths, rss = [], [], []
    while not stop.is_set():
        start = time.perf_counter()
        try:
            depths.append(httpx.get(f"{url}/v1/health", timeout=10).json()["queue_depth"])
            latencies.append(time.perf_counter() - start)
        except httpx.HTTPError:
            latencies.append(float("inf"))
        rss.append(rss_mb(pid))
        stop.wait(0.05)
    out.update(latencies=latencies, depths=depths, rss=rss)


def correct(body: bytes, image: np.ndarray, fill: np.ndarray, native: int) -> bool:
    """Same size; outside the mask + feather byte-identical; > 90% of the hole changed."""
    out = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    if out.shape != image.shape:
        return False
    outside = far_from_mask(fill, native)
    changed = (out != image).any(axis=-1)
    return bool((out[outside] == image[outside]).all() and changed[fill].mean() > 0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path, help="weights folder for moebius serve")
    source.add_argument("--tiny", action="store_true", help="a tiny random-weight pipeline")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--queue-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps per request")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--timeout", type=float, default=600.0, help="client time-out, s")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        weights = save_tiny_pipeline(Path(tmp) / "tiny") if args.tiny else args.weights
        port = free_port()
        log = Path(tmp) / "server.log"
        server, url = start_server(weights, port, args.queue_size, args.threads, log)
        try:
            info = httpx.get(f"{url}/v1/info").json()
            baseline_rss = rss_mb(server.pid)
            image, fill, (image_png, mask_png) = test_image()
            files = {"image": ("image.png", image_png), "mask": ("mask.png", mask_png)}
            watched, stop = {}, threading.Event()
            watcher = threading.Thread(target=watch, args=(url, server.pid, stop, watched))
            watcher.start()
            start = time.perf_counter()
            records = burst(url, args.requests, files, {"steps": str(args.steps)}, args.timeout)
            wall = time.perf_counter() - start
            stop.set()
            watcher.join()
        finally:
            stop_start = time.perf_counter()
            server.send_signal(signal.SIGTERM)
            try:
                exit_code = server.wait(120)
            except subprocess.TimeoutExpired:
                server.kill()
                exit_code = None
            shutdown_s = time.perf_counter() - stop_start
            server_log = log.read_text()

    statuses = [r["status"] for r in records]
    ok = [r for r in records if r["status"] == 200]
    latency_ok = np.array([r["latency_s"] for r in ok]) if ok else np.array([np.nan])
    health = np.array(watched["latencies"])
    result = {
        "benchmark": "server_load",
        "device": info["device"], "dtype": info["dtype"], "native_size": info["native_size"],
        "weights": "tiny random (tests/server_helpers.py)" if args.tiny else str(args.weights),
        "torch": torch.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "server_threads": args.threads, **machine_state(),
        "requests": args.requests, "queue_size": args.queue_size, "steps": args.steps,
        "image": f"{image.shape[1]}x{image.shape[0]} PNG, {int(fill.sum())} px hole",
        "status_counts": {str(s): statuses.count(s) for s in sorted(set(statuses), key=str)},
        "dropped": statuses.count(None),
        "server_errors_5xx_other_than_503": sum(
            1 for s in statuses if s is not None and s >= 500 and s != 503
        ),
        "all_503_have_retry_after": all(
            "retry-after" in r["headers"] for r in records if r["status"] == 503
        ),
        "all_200_images_correct": all(
            correct(r["body"], image, fill, info["native_size"]) for r in ok
        ),
        "burst_wall_s": round(wall, 3),
        "requests_per_s": round(len(records) / wall, 2),
        "completed_per_s": round(len(ok) / wall, 3),
        "latency_200_s": {"p50": round(float(np.percentile(latency_ok, 50)), 3),
                          "p95": round(float(np.percentile(latency_ok, 95)), 3),
                          "max": round(float(latency_ok.max()), 3)},
        "latency_all_s": {
            "p50": round(float(np.percentile([r["latency_s"] for r in records], 50)), 3),
            "p95": round(float(np.percentile([r["latency_s"] for r in records], 95)), 3),
        },
        "health_during_burst": {"polls": len(health), "answered": int(np.isfinite(health).sum()),
                                "p50_s": round(float(np.median(health)), 4),
                                "max_s": round(float(health.max()), 4),
                                "max_queue_depth": max(watched["depths"], default=0)},
        "rss_mb": {"before": round(baseline_rss, 1), "peak": round(max(watched["rss"]), 1),
                   "growth": round(max(watched["rss"]) - baseline_rss, 1)},
        # uvicorn re-raises the signal after its graceful shutdown, so the exit code is -15.
        "shutdown": {"signal": "SIGTERM", "exit_code": exit_code, "seconds": round(shutdown_s, 2),
                     "graceful": "Application shutdown complete" in server_log},
    }  # fmt: skip
    emit(result, args.out)


if __name__ == "__main__":
    main()
