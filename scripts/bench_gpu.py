#!/usr/bin/env python
"""Speed and memory on one GPU, in one run: each method's training step in bf16-mixed (fp32 weights,
bf16 autocast) at batch 8 x 512 on the embedded model, its peak CUDA memory, the step over one
frozen forward, LoReFT's intervened forward over a plain one, and generation tokens/s with and
without LoReFT at batch 32. A few minutes on a GPU (most of it loading the model once per method).

    python scripts/bench_gpu.py                          # SmolLM2-135M on cuda
    python scripts/bench_gpu.py --json bench_gpu.json    # also write the numbers
    python scripts/bench_gpu.py --smoke                  # tiny random model, tiny sizes, CPU: seconds

Memory first, before the plain copy used as the unit is loaded, so each peak is the method's own
(weights, gradients, optimiser state, activations); then the step and a frozen forward are timed
alternately, median of --reps. The helpers are those of scripts/bench_speed.py (the CPU benchmark).
"""
import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import load, make_batch, method_cfg, timed  # noqa: E402  (it puts src/ on the path)

METHODS = "loreft,lora,dora,red,full"


def synced(device, fn):
    """fn, timed to the end of its GPU work."""
    import torch

    def run():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


class Peak:
    """Peak CUDA memory allocated on a GPU; the process's peak RSS on the CPU (--smoke)."""

    def __init__(self, device):
        self.device, self.gib = device, None

    def __enter__(self):
        import torch
        from reftbench.record import PeakRSS
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            self.rss.__exit__(*exc)
            self.gib = self.rss.peak / 2**30


def model_on(args, device):
    loaded = load(args.model)
    return loaded.model.to(device), loaded.tokenizer


def measure_method(name, args, device, batch):
    import torch
    from reftbench import methods
    from reftbench.train import answer_loss
    torch.manual_seed(0)
    with Peak(device) as peak:
        model, _ = model_on(args, device)
        method = methods.build(method_cfg(name), model).to(device)
        opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-5)
        method.train()

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16), method.context(batch):
                loss = answer_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):  # optimiser state and the allocator's pools are in place after these
            step()
    plain, _ = model_on(args, device)  # LoRA/DoRA change the model they adapt: the unit runs on a copy

    def frozen():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum()

    step_t, frozen_t = synced(device, step), synced(device, frozen)
    frozen_t()
    ts, tf = [], []
    for _ in range(args.reps):
        tf.append(timed(frozen_t))
        ts.append(timed(step_t))
    out = {"method": name, "trainable": method.param_counts()["trainable"], "step_s": statistics.median(ts),
           "frozen_forward_s": statistics.median(tf), "peak_gib": peak.gib}
    out["step_over_frozen"] = out["step_s"] / out["frozen_forward_s"]
    del model, method, opt, plain
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def measure_inference(args, device, batch):
    """LoReFT's intervened forward / plain forward (the training batch), and greedy generation of
    --new-tokens at batch --gen-batch with and without it."""
    import torch
    from reftbench import methods
    from reftbench.data import collate_prompts, to_device
    from reftbench.methods.base import active
    torch.manual_seed(0)
    model, tok = model_on(args, device)
    method = methods.build(method_cfg("loreft"), model).to(device)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not the initialisation: a real edit
    method.eval()
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def forward(intervene):
        def run():
            with torch.inference_mode(), torch.autocast(**amp), active(method if intervene else None, batch):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.sum()
        return synced(device, run)

    ids = make_batch(tok, args.gen_batch, args.prompt_length, 0, seed=1)["input_ids"]
    lengths = [args.prompt_length - (i % 4) * args.prompt_length // 8 for i in range(args.gen_batch)]  # left padding
    prompts = to_device(collate_prompts([ids[i, :n].tolist() for i, n in enumerate(lengths)], tok.pad_token_id), device)

    def generate(intervene):
        kw = dict(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], do_sample=False,
                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)

        def run():
            with torch.inference_mode(), torch.autocast(**amp), active(method if intervene else None, prompts):
                model.generate(**kw)
        return synced(device, run)

    for f in (forward(True), forward(False), generate(True), generate(False)):
        f()  # warm-up: kernels, caches
    fp, fi, gp, gi = [], [], [], []
    for _ in range(args.reps):
        fp.append(timed(forward(False)))
        fi.append(timed(forward(True)))
        gp.append(timed(generate(False)))
        gi.append(timed(generate(True)))
    tokens = args.gen_batch * args.new_tokens
    return {"forward_ratio": statistics.median(fi) / statistics.median(fp),
            "gen_tok_s_plain": tokens / statistics.median(gp), "gen_tok_s_loreft": tokens / statistics.median(gi),
            "gen_ratio": statistics.median(gp) / statistics.median(gi)}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny random model and sizes, on the CPU unless --device")
    ap.add_argument("--model", default=None, help="default smollm2-135m (--smoke: tiny-random-llama)")
    ap.add_argument("--device", default=None, help="default cuda (--smoke: cpu)")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--answer", type=int, default=64, help="answer tokens per example (loss positions)")
    ap.add_argument("--gen-batch", type=int, default=32)
    ap.add_argument("--prompt-length", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", help="write the numbers to this file too")
    args = ap.parse_args(argv)
    if args.smoke:
        for k, v in dict(batch=2, length=32, answer=8, gen_batch=4, prompt_length=16, new_tokens=4, reps=2).items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    args.model = args.model or ("tiny-random-llama" if args.smoke else "smollm2-135m")
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.bf16 = not args.device.startswith("cpu")  # bf16 matmuls crawl on CPUs without bf16 units: fp32 there
    return args


def main(argv=None):
    import torch
    args = parse(argv)
    threads = torch.get_num_threads()
    if args.smoke:
        torch.set_num_threads(1)  # tiny matrices: threads only wait on each other (and on a busy machine, a lot)
    try:
        run(args)
    finally:
        torch.set_num_threads(threads)


def run(args):
    import torch
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device is visible (use --smoke for a CPU check of the script)")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model} on {where}, {'bf16-mixed' if args.bf16 else 'fp32'}, batch {args.batch}x{args.length} ({args.answer} answer tokens), "
          f"median of {args.reps}; unit = one frozen forward with full logits", flush=True)
    tok = load(args.model).tokenizer
    batch = {k: v.to(device) if torch.is_tensor(v) else v
             for k, v in make_batch(tok, args.batch, args.length, args.answer).items()}
    rows = [measure_method(m, args, device, batch) for m in args.methods.split(",")]
    memory = "peak CUDA (GiB)" if device.type == "cuda" else "peak RSS (GiB)"
    print(f"\n{'method':<8} {'trainable':>12} {'step (ms)':>10} {'step / frozen fwd':>18} {memory:>16}")
    for r in rows:
        print(f"{r['method']:<8} {r['trainable']:>12,} {1000 * r['step_s']:>10.1f} {r['step_over_frozen']:>18.2f} "
              f"{r['peak_gib']:>16.2f}")
    inf = measure_inference(args, device, batch)
    print(f"\nintervened forward / plain forward: {inf['forward_ratio']:.3f}")
    print(f"generation, {args.new_tokens} new tokens x {args.gen_batch}: {inf['gen_tok_s_loreft']:.0f} tok/s with "
          f"LoReFT vs {inf['gen_tok_s_plain']:.0f} without, ratio {inf['gen_ratio']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": where, "model": args.model, "args": vars(args),
                                               "methods": rows, "inference": inf}, indent=2) + "\n")


if __name__ == "__main__":
    main()
