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


# Instruction-set flags that decide which CPU kernels (and whether bf16 is native) torch can use.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def device_info(device: str = "cpu") -> dict:
    """Device name, CPU model and flags, torch version and thread count."""
    import platform

    import torch

    info = {"device_type": device, "torch": torch.__version__, "threads": torch.get_num_threads()}
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line]
    lines = cpuinfo.splitlines()
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    info["cpu"] = model[0] if model else platform.processor() or platform.machine()
    info["cpu_count"] = os.cpu_count()
    info["cpu_flags"] = {flag: flag in flags for flag in CPU_FLAGS}
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if device == "cuda":
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = info["cpu"]
    return info


def matmul_gflops(dtype, device: str = "cpu", size: int = 2048, runs: int = 5) -> float:
    """Median GFLOP/s of a size x size matmul in `dtype`: the machine's dense-math ceiling."""
    import statistics
    import time

    import torch

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = []
    for i in range(runs + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call is the warm-up
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def summarize(times: list[float]) -> dict:
    """Median, min, max and relative spread ((max - min) / median) of run times in seconds."""
    import statistics

    median = statistics.median(times)
    return {
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "spread": (max(times) - min(times)) / median,
        "runs_s": times,
    }


def interleaved(fns: dict, runs: int, sync=None) -> dict:
    """Time each callable `runs` times, round-robin so machine load affects all alike.

    One untimed warm-up call each first. Returns {name: summarize(times)}.
    """
    import time

    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            if sync:
                sync()
            start = time.perf_counter()
            fn()
            if sync:
                sync()
            times[name].append(time.perf_counter() - start)
    return {name: summarize(t) for name, t in times.items()}


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far, GiB (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def peak_rss_reset() -> None:
    """Reset this process's peak RSS counter (VmHWM) where Linux allows it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_gib_now() -> float:
    """VmHWM of this process in GiB (peak RSS since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def peak_memory_gib(fn, device: str = "cpu") -> float:
    """Peak memory of one call of `fn`: CUDA max allocated, or the process's peak RSS on CPU
    (which includes the weights and everything else alive during the call)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    peak_rss_reset()
    fn()
    return peak_rss_gib_now()
