#!/usr/bin/env python
"""Resident memory after each phase of scripts/bench_speed.py's measured steps (import, model load,
method wrap, then forward / backward / optimiser step of each step), with RssAnon and RssFile, and
each step's sampled peak. Shows where the bench's peak RSS comes from.

    PYTHONPATH=src python scripts/rss_phases.py [method] [steps]      # default: loreft 3
    MALLOC_MMAP_THRESHOLD_=65536 PYTHONPATH=src python scripts/rss_phases.py   # glibc returns freed tensors at once
"""
import re
import sys
from pathlib import Path


def line(tag: str) -> None:
    text = open("/proc/self/status").read()
    gib = {k: int(re.search(k + r":\s+(\d+)", text).group(1)) / 2**20 for k in ("VmRSS", "RssAnon", "RssFile")}
    print(f"{tag:<16} RSS {gib['VmRSS']:.3f}  anon {gib['RssAnon']:.3f}  file {gib['RssFile']:.3f} GiB", flush=True)


def main(name: str = "loreft", steps: str = "3"):
    line("start")
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_speed as bench
    from reftbench import methods
    from reftbench.record import PeakRSS
    from reftbench.train import answer_loss
    line("imports")
    torch.manual_seed(0)
    loaded = bench.load("smollm2-135m")
    model = loaded.model
    line("model loaded")
    batch = bench.make_batch(loaded.tokenizer, 8, 64, 16)
    method = methods.build(bench.method_cfg(name), model)
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-5)
    method.train()
    line("method wrapped")
    for i in range(int(steps)):
        with PeakRSS() as mem:
            with method.context(batch):
                loss = answer_loss(model, batch)
            line(f"step {i} forward")
            loss.backward()
            line(f"step {i} backward")
            opt.step()
            opt.zero_grad(set_to_none=True)
        line(f"step {i} done")
        print(f"step {i} peak RSS {mem.peak / 2**30:.3f} GiB", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
