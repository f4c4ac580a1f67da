"""Where the compressed model's fp32 |Δlogit| comes from (bench_compress.py --random-gates setting).

    OMP_NUM_THREADS=1 python scripts/ablate_dlogit.py [--model smollm2-135m] [--random-gates 0.3] [--seed 0]

Builds the gated model with the benchmark's seeded random gates, folds the gates into a dense copy (D: the
reference; bit for bit the gated model) and compresses a second copy (C). On the benchmark's 8 x 64 batch
it prints the largest |Δlogit| against D of:
- D itself run another way: each example alone (batch 1 x 64) and the batch as 2 x 4 (same math, other GEMM
  shapes: the fp32 noise floor of the dense model);
- C (everything compressed), D with only the attention blocks compressed, D with only the MLPs compressed;
- D with the MLPs' dead units deleted the plain way (nn.Linear without the zero units; no fusion, no
  alignment, no scatter) and D with only the attention's dead value dims deleted the plain way;
- per block, the output of C's block against D's block on the same input (D's hidden states), relative to
  the block output's largest magnitude.
"""
import argparse
import copy
import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_compress", ROOT / "scripts" / "bench_compress.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def plain_mlp(mlp, units: list[int]):
    """A copy of a dense LLaMA MLP with only `units` kept: plain Linears, nothing fused or padded."""
    new = copy.deepcopy(mlp)
    idx = torch.tensor(units)
    with torch.no_grad():
        for name in ("gate_proj", "up_proj"):
            lin = getattr(new, name)
            lin.weight = torch.nn.Parameter(lin.weight.index_select(0, idx).contiguous(), requires_grad=False)
            lin.out_features = len(units)
        new.down_proj.weight = torch.nn.Parameter(new.down_proj.weight.index_select(1, idx).contiguous(),
                                                  requires_grad=False)
        new.down_proj.in_features = len(units)
    return new


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-gates", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--length", type=int, default=64)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from omegaconf import OmegaConf
    from reftbench import compress, methods, models
    from reftbench.compress import plan as plan_mod
    bench = _bench()
    cfg = OmegaConf.load(ROOT / "conf" / "model" / f"{args.model}.yaml")
    loaded = models.load(cfg, kind="decoder", num_labels=2)
    dense, tok = loaded.model, loaded.tokenizer
    small = models.load(cfg, kind="decoder", num_labels=2).model
    gated = methods.build({"name": "finegates"}, dense)
    reached = bench._close_at_random(gated, args.random_gates, args.seed)
    other = methods.build({"name": "finegates"}, small)
    other.load_state_dict(gated.state_dict())
    gated.eval(), other.eval()
    ps = plan_mod.plans(gated)
    compress.shrink(other)
    gated.merge(keep_original=False)  # D: dense shapes, gates folded
    batch = bench.text_batch(tok, args.batch_size, args.length)
    x = batch["input_ids"]

    def logits(model, rows=None):
        with torch.inference_mode():
            if rows is None:
                return model(input_ids=x).logits
            return torch.cat([model(input_ids=x[i:i + rows]).logits for i in range(0, len(x), rows)])

    ref = logits(dense)
    print(f"{args.model}: {100 * reached:.1f}% of the non-embedding Linear weights removed, seed {args.seed}, "
          f"batch {tuple(x.shape)}, max |logit| {float(ref.abs().max()):.1f}")

    def report(what, out):
        d = (out - ref).abs()
        print(f"  {what:<58} max |dlogit| {float(d.max()):.2e}  mean {float(d.mean()):.1e}")

    report("D, each example alone (1 x 64)", logits(dense, rows=1))
    report("D, the batch as 2 x 4", logits(dense, rows=4))
    report("C, compressed", logits(small))
    report("C, compressed, each example alone", logits(small, rows=1))
    d_layers, c_layers = dense.model.layers, small.model.layers
    hybrid = copy.deepcopy(dense)
    for h, c in zip(hybrid.model.layers, c_layers):
        h.self_attn = c.self_attn
    report("D with C's attention blocks only", logits(hybrid))
    hybrid = copy.deepcopy(dense)
    for h, c in zip(hybrid.model.layers, c_layers):
        h.mlp = c.mlp
    report("D with C's MLPs only", logits(hybrid))
    hybrid = copy.deepcopy(dense)
    for h, p in zip(hybrid.model.layers, ps):
        live = [u for u in p.ffn if bool(h.mlp.down_proj.weight[:, u].any()) and bool(h.mlp.up_proj.weight[u].any())
                and bool(h.mlp.gate_proj.weight[u].any())]
        h.mlp = plain_mlp(h.mlp, live)
    report("D with dead MLP units deleted (plain Linears)", logits(hybrid))

    # per block, on D's own hidden states
    with torch.inference_mode():
        hidden = dense(input_ids=x, output_hidden_states=True).hidden_states
        pos = torch.arange(x.shape[1])[None]
        emb = dense.model.rotary_emb(hidden[0], pos)
        mask = None  # no padding: SDPA's is_causal, as in the model
        worst = []
        for i, (dl, cl) in enumerate(zip(d_layers, c_layers)):
            h = hidden[i]
            a_d = dl.self_attn(dl.input_layernorm(h), position_embeddings=emb, attention_mask=mask)[0]
            a_c = cl.self_attn(cl.input_layernorm(h), position_embeddings=emb, attention_mask=mask)[0]
            z = dl.post_attention_layernorm(h + a_d)
            m_d, m_c = dl.mlp(z), cl.mlp(z)
            worst.append((i, float((a_d - a_c).abs().max() / a_d.abs().max()),
                          float((m_d - m_c).abs().max() / m_d.abs().max()), float(h.abs().max())))
    print("  per block, same input (D's hidden state): max |Δ| / max |out| of attention, of MLP; max |residual|")
    for i, a, m, r in worst:
        print(f"    block {i:2d}: attention {a:.1e}  mlp {m:.1e}  residual {r:.0f}")


if __name__ == "__main__":
    main()
