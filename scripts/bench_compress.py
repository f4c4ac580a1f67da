"""CPU inference time of a FineGates model: dense against compressed, timed in one process, interleaved.

    python scripts/bench_compress.py RUN_DIR [--compressed DIR] [--batches 4] [--batch-size 32] [--repeats 20]
    python scripts/bench_compress.py --random-gates 0.3 --model smollm2-135m [--seed 0] [--threads 1]

--random-gates S: no training needed. The real model (conf/model/NAME.yaml) gets FineGates gates closed at
random (each gate closed with one probability, seeded, chosen by bisection so that the compressor removes
the share S of the non-embedding Linear weights), the rest fully open. Timed, interleaved: batch-1 greedy
decoding (tokens/s; an encoder: batch-1 forward, examples/s) and a batched forward (examples/s), dense
(gates folded in place: the cost of the finetuned model without compression) against compressed; printed
with the ratios, the largest |Δlogit| between the gated model and the compressed one (fp32 and fp64 on the
batch; fp32 over the batch-1 greedy steps), the dense model's own fp32 noise floor (the gated model against
itself with the gates folded, run one example at a time, and with its FFN units reordered: the same
function summed in another order), and the physical bound (the share of Linear FLOPs and of weight bytes
per token that is gone).

RUN_DIR mode:
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
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("--random-gates", type=float, metavar="S", help="close gates at random so that the share S "
                    "of the non-embedding Linear weights is removed (no run needed)")
    ap.add_argument("--json", type=Path, help="also write the measurement here (RUN_DIR/bench.json: the sweep report reads it)")
    ap.add_argument("--model", default="smollm2-135m", help="--random-gates: a conf/model name")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=32, help="--random-gates: greedy tokens per decoding")
    ap.add_argument("--length", type=int, default=64, help="--random-gates: tokens per example, batched forward (plain English text)")
    ap.add_argument("--compressed", help="a compressed checkpoint (default: RUN_DIR/compressed, else made now)")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=None, help="default 32; --random-gates: 8")
    ap.add_argument("--repeats", type=int, default=None, help="default 20; --random-gates: 7")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (fixed for both models)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    random = args.random_gates is not None
    args.batch_size = args.batch_size or (8 if random else 32)
    args.repeats = args.repeats or (7 if random else 20)
    if random:
        return random_gates(args)
    if args.run_dir is None:
        ap.error("pass RUN_DIR or --random-gates S")

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
    wall, cpu = _interleaved({"dense": dense, "compressed": small}, lambda mdl: [logits(mdl, b) for b in batches],
                             args.repeats, args.warmup)
    t_dense, t_comp = wall["dense"], wall["compressed"]
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
        "dense_cpu_seconds": cpu["dense"], "compressed_cpu_seconds": cpu["compressed"],
        "speedup_cpu": cpu["dense"] / cpu["compressed"],
        "removed_cascade_share_linear": info.get("removed_cascade_share_linear"),
        "score_trained": scores["trained"], "score_compressed": scores["compressed"],
    }
    print(json.dumps(out, indent=2))
    print(f"{record['model']} {record['task']} seed {record['seed']}: {100 * out['removed_share_model']:.1f}% of the "
          f"model's parameters removed ({100 * out['removed_cascade_share_gated']:.1f}% of the gated weights); "
          f"CPU forward {t_dense * 1e3:.1f} ms dense vs {t_comp * 1e3:.1f} ms compressed (median of {args.repeats}, "
          f"{args.threads} thread(s), {len(batches)}x{args.batch_size}): {t_dense / t_comp:.2f}x, "
          f"{100 * out['time_reduction']:.1f}% less time; CPU time {out['speedup_cpu']:.2f}x; max |dlogit| {delta:.2e}")
    _write_json(args, out)
    return out


def _write_json(args, out: dict) -> None:
    if args.json:
        from reftbench.atomic import atomic_path
        with atomic_path(args.json) as tmp:
            Path(tmp).write_text(json.dumps(out, indent=2))


def _interleaved(pair: dict, fn, repeats: int, warmup: int) -> tuple[dict, dict]:
    """Median wall and CPU seconds of fn(model) per model, timed in turn (load on the machine hits both
    alike). With one thread the process's CPU time is what an idle machine's wall time would be, near enough:
    other processes' load stretches wall time, not CPU time."""
    wall, cpu = {k: [] for k in pair}, {k: [] for k in pair}
    with torch.inference_mode():
        for _ in range(warmup):
            for m in pair.values():
                fn(m)
        for _ in range(repeats):
            for k, m in pair.items():
                t, c = time.perf_counter(), time.process_time()
                fn(m)
                wall[k].append(time.perf_counter() - t)
                cpu[k].append(time.process_time() - c)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def _close_at_random(method, share: float, seed: int) -> float:
    """Set every gate fully open or closed, each closed with one probability p, the same draws for every p
    (seeded); p found by bisection so that the compressor removes `share` of the non-embedding Linear
    weights. Returns the share reached."""
    from reftbench.compress.plan import plan_counts
    g = torch.Generator().manual_seed(seed)
    params = list(method.gates.parameters())
    draws = [torch.rand(p.shape, generator=g) for p in params]

    def apply(p_close):
        with torch.no_grad():
            for p, u in zip(params, draws):
                p.copy_(torch.where(u < p_close, -3.0, 3.0))
        return plan_counts(method)["sparsity_cascade_linear"]
    lo, hi = 0.0, 1.0
    for _ in range(20):
        mid = (lo + hi) / 2
        if apply(mid) < share:
            lo = mid
        else:
            hi = mid
    return apply(hi)


@torch.no_grad()
def _permute_units(model, seed: int):
    """Reorder every block's FFN hidden units in place (gate/up/intermediate rows and their biases, down
    columns; one seeded permutation per block): the same function, summed in another order. Returns undo()."""
    from reftbench import architectures as archs
    arch = archs.for_model(model)
    g = torch.Generator().manual_seed(seed)
    done = []
    for block in archs.blocks(model):
        down = archs.get(block, arch.path("ffn_down"))
        perm = torch.randperm(down.in_features, generator=g)
        writers = [archs.get(block, arch.path(r)) for r in ("ffn_gate", "ffn_up") if arch.path(r)]
        for m in writers:
            m.weight.copy_(m.weight[perm])
            if m.bias is not None:
                m.bias.copy_(m.bias[perm])
        down.weight.copy_(down.weight[:, perm])
        done.append((writers, down, torch.argsort(perm)))

    def undo():
        with torch.no_grad():
            for writers, down, inv in done:
                for m in writers:
                    m.weight.copy_(m.weight[inv])
                    if m.bias is not None:
                        m.bias.copy_(m.bias[inv])
                down.weight.copy_(down.weight[:, inv])
    return undo


TEXT = ("The river runs past the old mill and under the stone bridge before it reaches the town. In spring the "
        "water rises and the fields along the bank turn green; by late summer it is low enough to cross on foot. "
        "People in the town still argue about whether the mill should be repaired or pulled down, and the council "
        "has postponed its decision three times. Meanwhile children fish from the bridge, a baker sells bread at "
        "the market every Saturday, and the bus to the city leaves at seven in the morning. ")


def text_batch(tok, batch: int, length: int) -> dict:
    """`batch` windows of `length` tokens of plain English (TEXT repeated), shifted by a few tokens each."""
    ids = tok(TEXT * (2 + batch * length // 60), add_special_tokens=False)["input_ids"]
    rows = [ids[3 * i: 3 * i + length] for i in range(batch)]
    x = torch.tensor(rows)
    return {"input_ids": x, "attention_mask": torch.ones_like(x)}


def random_gates(args):
    from omegaconf import OmegaConf
    from reftbench import compress, methods, models
    from reftbench.methods.finegates import linear_weights
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / f"{args.model}.yaml")
    probe = models.load(cfg, kind="decoder" if args.model != "minilm-l6" else "encoder", num_labels=2)
    decoder = probe.model.config.model_type not in ("bert", "roberta")
    dense, tok = probe.model, probe.tokenizer
    small = models.load(cfg, kind="decoder" if decoder else "encoder", num_labels=2).model
    if not decoder:  # the classifier head is random per load: the same one in both
        small.load_state_dict(dense.state_dict())
    gated = methods.build({"name": "finegates"}, dense)
    reached = _close_at_random(gated, args.random_gates, args.seed)
    other = methods.build({"name": "finegates"}, small)
    other.load_state_dict(gated.state_dict())
    gated.eval(), other.eval()
    n_linear = linear_weights(dense)
    lm_head = dense.get_output_embeddings().weight.numel() if decoder else 0  # read for every token
    info = compress.shrink(other)
    del other

    batch = text_batch(tok, args.batch_size, args.length)
    prompt = text_batch(tok, 1, 16)["input_ids"]
    with torch.inference_mode():  # the gated model (hooks) against the compressed one
        ref, out = dense(**batch).logits, small(**batch).logits
        delta = float((ref - out).abs().max())
        # the dense model's own fp32 noise: the same examples one at a time (other GEMM shapes, same math)
        alone = torch.cat([dense(**{k: v[i:i + 1] for k, v in batch.items()}).logits
                           for i in range(len(batch["input_ids"]))])
        floor_alone = float((alone - ref).abs().max())
        # the same in float64 (copies cast back exactly afterwards): what is left is the compression's own error
        dense.double(), small.double()
        delta64 = float((dense(**batch).logits - small(**batch).logits).abs().max())
        dense.float(), small.float()
        same, delta_decode = True, None
        if decoder:
            kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                      pad_token_id=tok.pad_token_id or 0)
            gen = [m.generate(prompt, **kw, output_logits=True, return_dict_in_generate=True) for m in (dense, small)]
            same = torch.equal(gen[0].sequences, gen[1].sequences)
            # batch-1 decoding: each step multiplies one row (the BLAS's one-row path, no block sums)
            delta_decode = max(float((a - b).abs().max()) for a, b in zip(gen[0].logits, gen[1].logits))
    gated.merge(keep_original=False)  # dense shapes with the gates folded: the uncompressed cost
    with torch.inference_mode():  # fp32 rounding alone: the gated model against itself with the gates folded
        fold = float((dense(**batch).logits - ref).abs().max())
        undo = _permute_units(dense, args.seed)  # the same model, its FFN sums in another order
        floor_order = float((dense(**batch).logits - ref).abs().max())
        undo()
        assert float((dense(**batch).logits - ref).abs().max()) == fold  # undone exactly
    pair = {"dense": dense, "compressed": small}
    if decoder:
        one, one_cpu = _interleaved(pair, lambda m: m.generate(prompt, **kw), args.repeats, args.warmup)
        per = args.new_tokens
    else:
        single = {k: v[:1] for k, v in batch.items()}
        one, one_cpu = _interleaved(pair, lambda m: m(**single), args.repeats, args.warmup)
        per = 1
    one_rate = {k: per / v for k, v in one.items()}
    many, many_cpu = _interleaved(pair, lambda m: m(**batch), args.repeats, args.warmup)
    removed = info["removed_cascade"]
    out = {
        "model": args.model, "seed": args.seed, "asked": args.random_gates, "threads": args.threads,
        "repeats": args.repeats, "removed_share_linear": reached, "removed_share_model": info["params_removed_total"] / info["params_dense"],
        "linear_weights": n_linear, "params_dense": info["params_dense"], "params_compressed": info["params_compressed"],
        "max_abs_dlogit": delta, "max_abs_dlogit_fp64": delta64, "max_abs_dlogit_fold_only": fold,
        "max_abs_dlogit_decoding": delta_decode, "dense_floor_one_at_a_time": floor_alone,
        "dense_floor_units_reordered": floor_order,
        "max_abs_logit": float(ref.abs().max()), "same_greedy_tokens": same,
        "one_rate_dense": one_rate["dense"], "one_rate_compressed": one_rate["compressed"],
        "one_ratio": one_rate["compressed"] / one_rate["dense"],
        "batched_examples_per_s_dense": args.batch_size / many["dense"],
        "batched_examples_per_s_compressed": args.batch_size / many["compressed"],
        "batched_ratio": many["dense"] / many["compressed"],
        "one_ratio_cpu": one_cpu["dense"] / one_cpu["compressed"],
        "batched_ratio_cpu": many_cpu["dense"] / many_cpu["compressed"],
        "one_rate_dense_cpu": per / one_cpu["dense"], "one_rate_compressed_cpu": per / one_cpu["compressed"],
        # the bound if time were only the Linear layers: per token, FLOPs and weight bytes scale with the
        # Linear weights used (a decoder's tied LM head included: it is read and multiplied every token)
        "bound_linear_flops_and_bytes": (n_linear + lm_head) / (n_linear + lm_head - removed),
        "layers": [{"heads": l["heads"], "kv_heads": l["kv_heads"], "m_qk": l["m_qk"], "m_v": l["m_v"],
                    "units": l["units"]} for l in info["layers"]],
    }
    print(json.dumps({k: v for k, v in out.items() if k != "layers"}, indent=2))
    what = "greedy decoding, batch 1 (tokens/s)" if decoder else "forward, batch 1 (examples/s)"
    print(f"{args.model}: {100 * reached:.1f}% of the non-embedding Linear weights removed at random "
          f"({100 * out['removed_share_model']:.1f}% of the model), seed {args.seed}, {args.threads} thread(s), "
          f"median of {args.repeats}, interleaved"
          + ("" if not decoder else f"; greedy tokens {'identical' if same else 'DIFFER'}"))
    print(f"  max |dlogit| gated vs compressed, {args.batch_size}x{args.length} batch: {delta:.2e} in fp32 "
          f"({delta64:.1e} in fp64; max |logit| {out['max_abs_logit']:.1f})"
          + ("" if delta_decode is None else f"; over the {args.new_tokens} batch-1 greedy steps: {delta_decode:.2e}"))
    print(f"  dense fp32 noise floor, max |dlogit| against the gated model: gates folded {fold:.2e}; examples one "
          f"at a time {floor_alone:.2e}; FFN units in another order (same math, other summation order) "
          f"{floor_order:.2e}")
    print(f"  {what}: {one_rate['dense']:.2f} dense vs {one_rate['compressed']:.2f} compressed: "
          f"{out['one_ratio']:.2f}x wall; CPU time {out['one_rate_dense_cpu']:.2f} vs {out['one_rate_compressed_cpu']:.2f}: "
          f"{out['one_ratio_cpu']:.2f}x")
    print(f"  batched forward {args.batch_size}x{args.length} (examples/s): {out['batched_examples_per_s_dense']:.2f} "
          f"dense vs {out['batched_examples_per_s_compressed']:.2f} compressed: {out['batched_ratio']:.2f}x wall, "
          f"{out['batched_ratio_cpu']:.2f}x CPU time")
    print(f"  physical bound (Linear FLOPs and weight bytes per token{', LM head included' if decoder else ''}): "
          f"{out['bound_linear_flops_and_bytes']:.2f}x")
    _write_json(args, out)
    return out


if __name__ == "__main__":
    main()
