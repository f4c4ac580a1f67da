#!/usr/bin/env python
"""Training-step time of LoReFT with the Householder map (pyreft's, the default) vs the QR map.

Each map runs on its own copy of the model; the two steps are timed alternately in one process
(this machine is noisy) and the medians compared.

    THREADS=1 python scripts/bench_orthogonal_map.py --reps 7
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import torch  # noqa: E402
from bench_speed import load, make_batch, method_cfg  # noqa: E402
from reftbench import methods  # noqa: E402
from reftbench.train import answer_loss  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    if os.environ.get("THREADS"):
        torch.set_num_threads(int(os.environ["THREADS"]))
    steps = {}
    for orthogonal_map in ("householder", "qr"):
        torch.manual_seed(0)
        loaded = load(args.model)
        cfg = method_cfg("loreft")  # rank 4, all layers, f7+l7 tied
        cfg.orthogonal_map = orthogonal_map
        method = methods.build(cfg, loaded.model)
        opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-5)
        batch = make_batch(loaded.tokenizer, args.batch, args.length, 16)

        def step(model=loaded.model, method=method, opt=opt, batch=batch):
            t = time.perf_counter()
            with method.context(batch):
                loss = answer_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t

        step()
        steps[orthogonal_map] = (step, [])
    for _ in range(args.reps):
        for step, times in steps.values():
            times.append(step())
    med = {k: statistics.median(times) for k, (_, times) in steps.items()}
    print(f"{args.model}, batch {args.batch}x{args.length}, {torch.get_num_threads()} threads, median of {args.reps}: "
          f"householder {med['householder']:.3f}s, qr {med['qr']:.3f}s, ratio {med['householder'] / med['qr']:.3f}")


if __name__ == "__main__":
    main()
