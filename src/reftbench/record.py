"""The result record: everything needed to trust, compare and reproduce a run."""
import json
import os
import platform
import resource
import subprocess
import sys
import threading
from importlib import metadata
from pathlib import Path

import torch

from .atomic import atomic_path

PACKAGES = ("reftbench", "torch", "transformers", "peft", "datasets", "hydra-core", "omegaconf",
            "tokenizers", "safetensors", "reasoning-gym")


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parent
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if res.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return res.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap back to the OS, so that a run in a multirun starts from
    what is really in use rather than what glibc kept from the jobs before it."""
    import ctypes
    import gc
    gc.collect()
    if torch.cuda.is_initialized():  # blocks cached by PyTorch's allocator go back to the driver
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every few ms.

    ru_maxrss can't be reset, so in a multirun it would report the largest earlier job."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def current() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: fall back to the process-lifetime peak
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current())

    def __enter__(self):
        release_freed_memory()
        reset_cuda_peak()
        self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def reset_cuda_peak() -> None:
    """Start CUDA's peak counters from now: in a multirun every job measures its own peak, not the
    largest of the jobs before it in the same process."""
    if torch.cuda.is_initialized():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def peak_memory(device: torch.device, rss: PeakRSS) -> dict:
    out = {"cpu_peak_rss_gib": rss.peak / 2**30}
    if device.type == "cuda":
        out["cuda_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["cuda_peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return out


def write_json_atomic(path, data) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def command_line() -> str:
    return " ".join(sys.argv)
