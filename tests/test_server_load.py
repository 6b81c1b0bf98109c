"""A short run of bench/server_load.py: a burst from a separate client process over loopback.

The bench starts `moebius serve` (tiny random weights, queue size 4) in a subprocess and fires
concurrent requests; every answer must be 200 or 503, none dropped, every 200 image correct.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_burst_answers_200_or_503_with_bounded_memory(tmp_path):
    out = tmp_path / "load.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [
        sys.executable,
        str(ROOT / "bench" / "server_load.py"),
        "--tiny",
        "--requests",
        "20",
        "--queue-size",
        "4",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    subprocess.run(command, check=True, env=env, cwd=ROOT, timeout=540, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    counts = result["status_counts"]
    assert set(counts) <= {"200", "503"} and sum(counts.values()) == 20, counts
    assert result["dropped"] == 0 and result["server_errors_5xx_other_than_503"] == 0
    # Queue 4 + one running batch of at most 4: some requests must have been refused...
    assert counts.get("503", 0) >= 1 and result["all_503_have_retry_after"]
    # ...and the ones accepted were all answered with correct images.
    assert counts.get("200", 0) >= 1 and result["all_200_images_correct"]
    assert result["health_during_burst"]["max_queue_depth"] <= 4 + 4
    health = result["health_during_burst"]
    assert health["polls"] >= 1 and health["answered"] == health["polls"]
    assert result["rss_mb"]["growth"] < 1024  # bounded: the queue holds at most 4 decoded images
    assert result["shutdown"]["graceful"]
