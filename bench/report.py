"""What every benchmark records about the machine, and how it prints and saves its JSON."""

import json
import os
from pathlib import Path


def machine_state() -> dict:
    """Load average and glibc malloc settings: both move CPU timings on a shared VM."""
    return {
        "load_average_1min": os.getloadavg()[0],
        # glibc malloc settings: large temporaries otherwise page-fault on every call here.
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }


def emit(result: dict, out: Path | None = None) -> None:
    """Print the result as JSON and, with `out`, also write it there."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
