#!/usr/bin/env python
"""Speed and memory of a training step, an intervened forward and generation, side by side.

Unit: one frozen forward pass with full logits on the same batch. Every ratio is measured in one
process with the two things timed alternately (this machine is noisy), median of --reps.
Each method runs in its own subprocess so its peak memory is its own.

    python scripts/bench_speed.py                       # SmolLM2-135M, batch 8x64, loreft
    python scripts/bench_speed.py --methods loreft,lora,full
    python scripts/bench_speed.py --malloc default        # glibc's own malloc settings, for comparison
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from reftbench import allocator  # noqa: E402
from reftbench.record import PeakRSS  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def load(model_name):
    from omegaconf import OmegaConf
    from reftbench import models
    return models.load(OmegaConf.load(ROOT / "conf" / "model" / f"{model_name}.yaml"))


def make_batch(tok, batch, length, answer, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(tok), (batch, length), generator=g)  # no special tokens
    labels = torch.full_like(ids, -100)
    labels[:, length - answer:] = ids[:, length - answer:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "prompt_lengths": [length - answer] * batch, "prompt_offsets": [0] * batch}


def method_cfg(name):
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(ROOT / "conf" / "intervention" / f"{name}.yaml")
    if name in ("loreft", "noreft", "direft"):  # the bar's setting: rank 4, all layers, f7+l7 tied
        cfg.rank, cfg.layers, cfg.positions, cfg.share_weights = 4, "all", "f7+l7", True
    return cfg


def measure_method(args):
    """Child process: one method's step time (in frozen forwards) and its peak memory."""
    import torch
    from reftbench import methods
    from reftbench.train import answer_loss
    torch.manual_seed(0)
    loaded = load(args.model)
    model = loaded.model
    batch = make_batch(loaded.tokenizer, args.batch, args.length, args.answer)
    method = methods.build(method_cfg(args.one), model)
    params = method.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-5)
    method.train()

    def step():
        with method.context(batch):
            loss = answer_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Memory first, before anything else has run: the peak of the first steps (optimiser state
    # included), not heap left over by other work.
    with PeakRSS() as mem:
        for _ in range(3):
            step()
    # The unit is a forward of the untouched model. LoRA/DoRA change the model they are injected
    # into for good, so the frozen forward runs on a second, plain copy, timed alternately.
    plain = load(args.model).model

    def frozen():
        with torch.inference_mode():
            plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum()

    frozen()
    ts, tf = [], []
    for _ in range(args.reps):
        tf.append(timed(frozen))
        ts.append(timed(step))
    out = {"method": args.one, "step_s": statistics.median(ts), "frozen_s": statistics.median(tf),
           "peak_gib": mem.peak / 2**30, "trainable": method.param_counts()["trainable"]}
    out["step_over_frozen"] = out["step_s"] / out["frozen_s"]
    print(json.dumps(out))


def measure_inference(args):
    """Intervened forward vs plain forward, and generation throughput with vs without."""
    import torch
    from reftbench import methods
    from reftbench.data import collate_prompts
    torch.manual_seed(0)
    loaded = load(args.model)
    model, tok = loaded.model, loaded.tokenizer
    batch = make_batch(tok, args.batch, args.length, 0)
    method = methods.build(method_cfg("loreft"), model)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not the init: a real edit
    method.eval()

    def fwd(with_method):
        def f():
            with torch.inference_mode():
                if with_method:
                    with method.context(batch):
                        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum()
                else:
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum()
        return f

    prompts = collate_prompts([batch["input_ids"][i, : args.length - 8 * (i % 3)].tolist()
                               for i in range(args.batch)], tok.pad_token_id)
    new = args.new_tokens

    def gen(with_method):
        def f():
            kw = dict(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"],
                      max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
            with torch.inference_mode():
                if with_method:
                    with method.context(prompts):
                        model.generate(**kw)
                else:
                    model.generate(**kw)
        return f

    fwd(True)(), fwd(False)(), gen(True)(), gen(False)()
    fp, fi, gp, gi = [], [], [], []
    for _ in range(args.reps):
        fp.append(timed(fwd(False)))
        fi.append(timed(fwd(True)))
        gp.append(timed(gen(False)))
        gi.append(timed(gen(True)))
    tokens = args.batch * new
    print(json.dumps({"forward_ratio": statistics.median(fi) / statistics.median(fp),
                      "gen_tok_s_plain": tokens / statistics.median(gp),
                      "gen_tok_s_intervened": tokens / statistics.median(gi),
                      "gen_ratio": statistics.median(gp) / statistics.median(gi)}))


def child_env(args) -> dict | None:
    """The children's environment: the reftbench command's malloc settings, or None (this one's)."""
    return allocator.environ() if args.malloc == "cli" and allocator.applies() else None


def child(args, **extra):
    cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--length",
           str(args.length), "--answer", str(args.answer), "--reps", str(args.reps),
           "--new-tokens", str(args.new_tokens)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args))
    if res.returncode:
        sys.exit(f"bench child failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="loreft")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--answer", type=int, default=16, help="answer tokens per example (loss positions)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--malloc", choices=["cli", "default"], default="cli",
                    help="cli: glibc's malloc set up as the reftbench command runs (allocator.py); default: glibc's defaults")
    ap.add_argument("--child", choices=["method", "inference"], help=argparse.SUPPRESS)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "method":
        return measure_method(args)
    if args.child == "inference":
        return measure_inference(args)

    import torch
    print(f"model {args.model}, batch {args.batch}x{args.length} ({args.answer} answer tokens each), "
          f"{torch.get_num_threads()} threads, median of {args.reps}; unit = one frozen forward with full logits",
          flush=True)
    env = child_env(args)
    print("malloc: " + (f"GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (as the reftbench command runs)"
                        if env else "the system's defaults"), flush=True)
    print(f"\n{'method':<8} {'trainable':>12} {'step (s)':>9} {'step / frozen fwd':>18} {'peak RSS (GiB)':>15}")
    rows = []
    for m in args.methods.split(","):  # each row as soon as its process is done (a loaded machine is slow)
        r = child(args, child="method", one=m)
        rows.append(r)
        print(f"{r['method']:<8} {r['trainable']:>12,} {r['step_s']:>9.3f} {r['step_over_frozen']:>18.2f} {r['peak_gib']:>15.2f}",
              flush=True)
    by = {r["method"]: r for r in rows}
    for other in ("lora", "full"):
        if "loreft" in by and other in by:
            print(f"loreft / {other}: step time {by['loreft']['step_over_frozen'] / by[other]['step_over_frozen']:.2f}, "
                  f"peak memory {by['loreft']['peak_gib'] / by[other]['peak_gib']:.2f}")
    inf = child(args, child="inference")
    print(f"\nintervened forward / plain forward: {inf['forward_ratio']:.3f}  (target <= 1.05)")
    print(f"generation, {args.new_tokens} new tokens x {args.batch}: {inf['gen_tok_s_intervened']:.1f} tok/s with "
          f"LoReFT vs {inf['gen_tok_s_plain']:.1f} without, ratio {inf['gen_ratio']:.3f}  (target >= 0.95)")


if __name__ == "__main__":
    main()
