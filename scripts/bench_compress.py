"""CPU inference time of a FineGates run: the dense finetuned model against its compressed checkpoint.

    python scripts/bench_compress.py RUN_DIR [--compressed DIR] [--batches 4] [--batch-size 32] [--repeats 20]

In one process, on the same test batches: the dense model (the base model with the trained gates folded
into its weights: the dense cost) and the compressed one (RUN_DIR/compressed, or made now into a temporary
folder). Warm-up first, then `repeats` rounds that time one pass of each in turn (interleaved, so load on
the machine hits both alike); the medians, their ratio and the sparsity reached are printed, with the
largest |Δlogit| between the two and the task scores the run recorded.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--compressed", help="a compressed checkpoint (default: RUN_DIR/compressed, else made now)")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (fixed for both models)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from omegaconf import OmegaConf
    from reftbench import compress, methods, models, tasks
    from reftbench.objectives import OBJECTIVES
    from reftbench.errors import ReftbenchError

    run = Path(args.run_dir)
    try:
        if not (run / "result.json").is_file():
            raise ReftbenchError(f"{run} has no result.json: pass a finished finegates run folder")
        record = json.loads((run / "result.json").read_text())
        cfg = OmegaConf.create(record["config"])
        compress.check_compressible(cfg.intervention.name)
        task = tasks.build(cfg.task)
        kind = OBJECTIVES[task.kind]
        loaded = models.load(cfg.model, kind=kind.model_kind, num_labels=task.num_labels, seed=int(cfg.seed))
        path = Path(args.compressed) if args.compressed else run / "compressed"
        if not (path / "compress.json").is_file():
            path = Path(tempfile.mkdtemp()) / "compressed"
            again = models.load(cfg.model, kind=kind.model_kind, num_labels=task.num_labels, seed=int(cfg.seed))
            compress.compress_model(again.model, again.tokenizer, run / "intervention", path)
        small = compress.load(path)
    except ReftbenchError as e:
        print(f"bench_compress: error: {e}", file=sys.stderr)
        sys.exit(2)
    info = json.loads((path / "compress.json").read_text())

    dense = loaded.model
    head = run / "intervention" / "head.safetensors"
    if head.is_file():
        from safetensors.torch import load_file
        dense.load_state_dict(load_file(str(head)), strict=False)
    method = methods.load(run / "intervention", dense)
    method.eval()
    method.merge()  # dense shapes, gates folded: what the finetuned model costs without compression

    objective = kind(task, loaded.tokenizer, cfg.trainer.max_length)
    test = task.load_splits(int(cfg.seed))["test"]
    examples = objective.encode(test)[: args.batches * args.batch_size]
    batches = [objective.collate(examples[i:i + args.batch_size]) for i in range(0, len(examples), args.batch_size)]

    def logits(model, b):
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits

    with torch.inference_mode():
        delta = 0.0
        for b in batches:
            keep = b["attention_mask"].bool() if logits(dense, b).dim() == 3 else slice(None)
            delta = max(delta, float((logits(dense, b) - logits(small, b))[keep].abs().max()))
        for _ in range(args.warmup):
            for model in (dense, small):
                for b in batches:
                    logits(model, b)
        times = {"dense": [], "compressed": []}
        for _ in range(args.repeats):
            for name, model in (("dense", dense), ("compressed", small)):
                t = time.perf_counter()
                for b in batches:
                    logits(model, b)
                times[name].append(time.perf_counter() - t)
    t_dense, t_comp = statistics.median(times["dense"]), statistics.median(times["compressed"])
    m = record.get("metrics", {})
    scores = {k: (m.get(k) or {}).get("score") for k in ("trained",)}
    scores["compressed"] = ((record.get("compressed") or {}).get("metrics") or {}).get("score")
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    out = {
        "run": str(run), "model": record["model"], "task": record["task"], "seed": record["seed"],
        "params_dense": info["params_dense"], "params_compressed": info["params_compressed"],
        "removed_share_model": info["params_removed_total"] / info["params_dense"],
        "removed_cascade_share_gated": info["removed_cascade_share_gated"],
        "removed_per_layer_share_gated": info["removed_per_layer_share_gated"],
        "batches": len(batches), "batch_size": args.batch_size, "tokens": tokens, "threads": args.threads,
        "repeats": args.repeats, "dense_seconds": t_dense, "compressed_seconds": t_comp,
        "speedup": t_dense / t_comp, "time_reduction": 1 - t_comp / t_dense, "max_abs_dlogit": delta,
        "score_trained": scores["trained"], "score_compressed": scores["compressed"],
    }
    print(json.dumps(out, indent=2))
    print(f"{record['model']} {record['task']} seed {record['seed']}: {100 * out['removed_share_model']:.1f}% of the "
          f"model's parameters removed ({100 * out['removed_cascade_share_gated']:.1f}% of the gated weights); "
          f"CPU forward {t_dense * 1e3:.1f} ms dense vs {t_comp * 1e3:.1f} ms compressed (median of {args.repeats}, "
          f"{args.threads} thread(s), {len(batches)}x{args.batch_size}): {t_dense / t_comp:.2f}x, "
          f"{100 * out['time_reduction']:.1f}% less time; max |dlogit| {delta:.2e}")
    return out


if __name__ == "__main__":
    main()
