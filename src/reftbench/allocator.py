"""glibc's malloc set up for training steps (Linux with glibc only).

A step allocates and frees hundreds of MB of activations in a few sizes, between which autograd
keeps many small objects alive. glibc parks small freed chunks in per-size caches (tcache and
fastbins) that are never merged with their neighbours, so they pin the holes between the large
tensors: on SmolLM2-135M a LoReFT step held ~0.1 GiB more heap than it used (README, "Speed and
memory"). With both caches off the holes merge and are reused; bench_speed measured no slower step.

glibc reads these settings only when a process starts, so the command-line entry points run
`reexec()` first: the same command again, in the same process (same PID: SLURM, torchrun and
signals see nothing), with GLIBC_TUNABLES extended. Settings the user already gave for the same
keys are kept. REFTBENCH_MALLOC=default turns this off.
"""
import os
import platform
import sys

TUNABLES = {"glibc.malloc.tcache_count": "0", "glibc.malloc.mxfast": "0"}
OPT_OUT = "REFTBENCH_MALLOC"


def applies(env=None) -> bool:
    env = os.environ if env is None else env
    return (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
            and env.get(OPT_OUT, "") != "default")


def _parse(value: str) -> dict:
    return dict(item.split("=", 1) for item in value.split(":") if "=" in item)


def environ(env=None) -> dict:
    """A copy of `env` (default os.environ) whose GLIBC_TUNABLES also holds TUNABLES, the user's own
    entries first and untouched."""
    env = dict(os.environ if env is None else env)
    have = _parse(env.get("GLIBC_TUNABLES", ""))
    extra = [f"{k}={v}" for k, v in TUNABLES.items() if k not in have]
    if extra:
        env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES", "")] + extra))
    return env


def reexec() -> None:
    """Replace this process with the same command under `environ()`, unless that is already its
    environment (or the tuning does not apply). Call first thing in an entry point, never from a
    library function: the caller's process is replaced."""
    if not applies() or not sys.executable:
        return
    env = environ()
    if env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
    except OSError:  # an interpreter that can't be started again: run as it is, with glibc's defaults
        return
