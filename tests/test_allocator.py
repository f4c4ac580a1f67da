"""glibc's malloc set-up: the entry points re-execute once with GLIBC_TUNABLES extended, keep the
user's own settings, can be turned off, and glibc really applies them."""
import os
import subprocess
import sys
import textwrap

import pytest

from reftbench import allocator, cli

glibc = pytest.mark.skipif(not allocator.applies({}), reason="Linux with glibc only")


def test_environ_extends_and_keeps_the_users_settings():
    env = allocator.environ({"PATH": "/bin"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0"
    env = allocator.environ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=3:glibc.malloc.arena_max=2"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.tcache_count=3:glibc.malloc.arena_max=2:glibc.malloc.mxfast=0"
    assert allocator.environ(env) == env  # nothing left to add: no second re-exec


def test_opt_out():
    assert not allocator.applies({allocator.OPT_OUT: "default"})


def test_the_command_sets_up_malloc_before_anything_else(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "reexec", lambda: calls.append("reexec"))
    monkeypatch.setattr(cli, "main", lambda: calls.append("main"))
    cli.entry()
    assert calls == ["reexec", "main"]


PROBE = textwrap.dedent("""
    import ctypes, os, sys
    from reftbench import allocator
    print("start", os.getpid(), flush=True)
    allocator.reexec()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc.mallinfo2.restype = Info
    blocks = [libc.malloc(40) for _ in range(200)]
    for b in blocks[::2]:  # every other one: the freed chunks can't merge with each other
        libc.free(b)
    print("end", os.getpid(), os.environ.get("GLIBC_TUNABLES"), libc.mallinfo2().fsmblks, flush=True)
""")


def probe(env):
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@glibc
def test_reexec_applies_the_tunables_in_the_same_process():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", allocator.OPT_OUT)}
    words = probe(env)
    # printed once before the re-exec and once after it, under the same PID
    assert words[0] == "start" and words[2] == "start" and words[1] == words[3] == words[5]
    assert words[6] == "glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0"
    assert int(words[7]) == 0  # no freed chunk parked in a fastbin
    off = probe({**env, allocator.OPT_OUT: "default"})
    assert off.count("start") == 1 and off[4] == "None"
    assert int(off[5]) > 0  # glibc's default parks small freed chunks in fastbins (after the tcache's 7)


@glibc
def test_an_interpreter_that_cannot_be_restarted_runs_on(monkeypatch):
    def refuse(*args):
        raise PermissionError("no exec here")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv(allocator.OPT_OUT, raising=False)
    monkeypatch.setattr(os, "execve", refuse)
    allocator.reexec()  # returns instead of raising
