"""Which rows and columns survive compression (spec §3.2), from the eval gates alone.

Per block, with g_r / g_c the eval gates (all ones for a Linear that is not gated):
- MLP hidden unit k lives iff it is open in every writer (LLaMA gate_proj and up_proj rows, BERT
  intermediate rows) and in the reader (down_proj / output.dense column k): act(0) = 0 and x·0 = 0.
- Value dim d of kv-head g lives iff v row (g, d) is open and some query head of g's group reads it
  through an open o_proj column.
- Query/key dim d of kv-head g lives iff k row (g, d) is open and some query head of the group has
  q row d open. With RoPE the dims (d, d + hd/2) rotate together, so they live or go as a pair; a
  per-head norm on q/k (Gemma 3) keeps them all.
- Heads of one layer are padded to the widest head (padding rows are zero, index -1).
- Residual readers (q, k, v, MLP inputs) gather their open columns; residual writers (o_proj,
  down_proj rows) scatter into the full width.
"""
from dataclasses import dataclass, field

import torch

from .. import architectures as archs
from ..errors import ConfigError


COMPRESSIBLE = {"llama", "mistral", "qwen2", "bert", "roberta"}


@dataclass
class LayerPlan:
    heads: int
    kv_heads: int
    head_dim: int
    rope: bool
    qk: list[list[int]]            # per kv head: kept q/k dims (RoPE: first halves of the kept pairs)
    v: list[list[int]]             # per kv head: kept value dims
    ffn: list[int]                 # kept MLP hidden units
    cols: dict[str, list[int]]     # role -> kept input columns (readers of the residual stream)
    rows: dict[str, list[int]]     # role -> kept output rows (writers to the residual stream: o, ffn_down)
    m_qk: int = 0                  # stored width of a q/k head (RoPE: 2 × pairs)
    m_v: int = 0
    index: dict[str, list[int]] = field(default_factory=dict)  # role -> stored row index, -1 = padding

    def in_index(self, role: str, n_in: int) -> list[int]:
        if role in self.cols:
            return self.cols[role]
        if role == "o":
            return self.index["o_cols"]
        if role == "ffn_down":
            return self.ffn
        return list(range(n_in))

    def out_index(self, role: str, n_out: int) -> list[int]:
        if role in ("q", "k", "v"):
            return self.index[role]
        if role in ("ffn_gate", "ffn_up"):
            return self.ffn
        return self.rows.get(role, list(range(n_out)))


def _open(g: torch.Tensor) -> torch.Tensor:
    return g > 0


def layer_plan(arch: archs.Arch, n: int, kv: int, hd: int, gates: dict) -> LayerPlan:
    """gates: role -> (row gates, column gates) for every role of the block (ones where not gated)."""
    group = n // kv
    q = _open(gates["q"][0]).view(n, hd)
    k = _open(gates["k"][0]).view(kv, hd)
    v = _open(gates["v"][0]).view(kv, hd)
    o_cols = _open(gates["o"][1]).view(n, hd)
    q_any = q.view(kv, group, hd).any(1)            # some query head of the group has dim d open
    o_any = o_cols.view(kv, group, hd).any(1)
    if arch.qk_norm:
        qk = [list(range(hd)) for _ in range(kv)]
    elif arch.rope:
        half = hd // 2
        pair = lambda t: t[:, :half] | t[:, half:]   # noqa: E731  the pair is alive if either dim is
        live = pair(k) & pair(q_any)
        qk = [torch.nonzero(live[g]).flatten().tolist() for g in range(kv)]
    else:
        live = k & q_any
        qk = [torch.nonzero(live[g]).flatten().tolist() for g in range(kv)]
    vk = [torch.nonzero((v & o_any)[g]).flatten().tolist() for g in range(kv)]
    unit = _open(gates["ffn_up"][0]) & _open(gates["ffn_down"][1])
    if arch.ffn_gate:
        unit &= _open(gates["ffn_gate"][0])
    plan = LayerPlan(heads=n, kv_heads=kv, head_dim=hd, rope=arch.rope and not arch.qk_norm, qk=qk, v=vk,
                     ffn=torch.nonzero(unit).flatten().tolist(),
                     cols={r: torch.nonzero(_open(gates[r][1])).flatten().tolist()
                           for r in ("q", "k", "v", "ffn_gate", "ffn_up") if r in gates},
                     rows={r: torch.nonzero(_open(gates[r][0])).flatten().tolist() for r in ("o", "ffn_down")})
    width = max(1, max(len(d) for d in qk))
    plan.m_qk = 2 * width if plan.rope else width
    plan.m_v = max(1, max(len(d) for d in vk))
    half = hd // 2

    def pad(dims, m):
        return dims + [-1] * (m - len(dims))

    def qk_dims(g):  # within-head dims of kv head g, in stored order
        if plan.rope:
            p = pad(qk[g], width)
            return p + [d + half if d >= 0 else -1 for d in p]
        return pad(qk[g], width)

    def heads_index(dims_of, count):
        return [h * hd + d if d >= 0 else -1 for h in range(count) for d in dims_of(h)]

    plan.index["q"] = heads_index(lambda h: qk_dims(h // group), n)
    plan.index["k"] = heads_index(qk_dims, kv)
    plan.index["v"] = heads_index(lambda g: pad(vk[g], plan.m_v), kv)
    plan.index["o_cols"] = heads_index(lambda h: pad(vk[h // group], plan.m_v), n)
    plan.index["rope"] = [d if d >= 0 else 0 for g in range(kv) for d in qk_dims(g)]  # cos/sin gather
    return plan


def block_gates(method, gates: dict, layer: int) -> dict:
    """role -> (row gates, column gates) of one block; ones for a Linear the method does not gate."""
    arch = method.arch
    block = archs.blocks(method.model_ref)[layer]
    out = {}
    for role in arch.roles:
        name = f"{layer}.{arch.path(role)}"
        if name in gates:
            out[role] = gates[name]
        else:
            m = archs.get(block, arch.path(role))
            out[role] = (torch.ones(m.out_features), torch.ones(m.in_features))
    return out


def plans(method) -> list[LayerPlan]:
    arch = method.arch
    mt = method.model_ref.config.model_type
    if mt not in COMPRESSIBLE:  # Gemma: its own attention scaling, soft-capping and q/k norms are not rebuilt
        raise ConfigError(f"compression supports {', '.join(sorted(COMPRESSIBLE))} models, not {mt}")
    n, kv, hd = archs.heads(method.model_ref)
    gates = method.eval_gates()
    return [layer_plan(arch, n, kv, hd, block_gates(method, gates, i))
            for i in range(len(archs.blocks(method.model_ref)))]


def stored_shape(plan: LayerPlan, role: str, n_out: int, n_in: int) -> tuple[int, int]:
    return len(plan.out_index(role, n_out)), len(plan.in_index(role, n_in))


def plan_counts(method) -> dict:
    """Weight elements removed by the cascade-aware rules, beside the authors' per-layer count."""
    ps = plans(method)
    arch, blocks = method.arch, archs.blocks(method.model_ref)
    gated = removed = 0
    for i, (plan, block) in enumerate(zip(ps, blocks)):
        for role in arch.roles:
            if f"{i}.{arch.path(role)}" not in method.linears:
                continue
            m = archs.get(block, arch.path(role))
            rows, cols = stored_shape(plan, role, m.out_features, m.in_features)
            gated += m.out_features * m.in_features
            removed += m.out_features * m.in_features - rows * cols
    return {"removed_cascade": removed, "sparsity_cascade_gated": removed / gated,
            "sparsity_cascade_model": removed / method.base_params}
