"""Memory of tokenised training data held as Python int lists (one dict of lists per example, as before)
and as reftbench.data.Examples (flat int32 arrays + offsets), for a synthetic set of N examples.

    PYTHONPATH=src python scripts/bench_token_memory.py [N]

Token ids are random in [0, 32000) (LLaMA's vocabulary), prompts 40-160 tokens, answers 5-60, so the
ints are distinct objects as a tokenizer returns them. Measured with tracemalloc (Python allocations).
"""
import sys
import tracemalloc

import numpy as np

from reftbench.data import Examples


def synthetic(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        p, a = int(rng.integers(40, 161)), int(rng.integers(5, 61))
        ids = rng.integers(0, 32000, p + a).tolist()
        yield {"input_ids": ids, "labels": [-100] * p + ids[p:], "prompt_length": p, "truncated": False}


def measure(build) -> tuple[int, int]:
    tracemalloc.start()
    held = build()
    size, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del held
    return size, peak


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    tokens = sum(len(e["input_ids"]) for e in synthetic(n))
    print(f"{n:,} examples, {tokens:,} tokens")
    for name, build in (("int lists", lambda: list(synthetic(n))), ("Examples", lambda: Examples.build(synthetic(n)))):
        size, peak = measure(build)
        print(f"{name:10s} held {size / 2**20:8.1f} MiB ({size / tokens:5.1f} B/token), peak while built {peak / 2**20:8.1f} MiB")
