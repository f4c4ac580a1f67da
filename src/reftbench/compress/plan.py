"""Which rows and columns survive compression (spec §3.2), from the eval gates alone.

Per block, with g_r / g_c the eval gates (all ones for a Linear that is not gated):
- MLP hidden unit k lives iff it is open in every writer (LLaMA gate_proj and up_proj rows, BERT
  intermediate rows) and in the reader (down_proj / output.dense column k): act(0) = 0 and x·0 = 0.
- A query head lives iff some value dim reaches the output: v row (g, d) open and its o_proj column
  (h, d) open. Dead heads go; on GQA every kept kv head keeps the same number of query heads (the widest
  group's count, topped up with dead heads of the group, whose output is zero), so groups stay uniform.
  A kv head whose query heads are all dead goes.
- Value dim d of a kept kv head lives iff v row (g, d) is open and a live query head reads it through an
  open o_proj column. Query/key dim d lives iff k row (g, d) is open and a live query head of the group
  has q row d open; with RoPE the dims (d, d + hd/2) rotate together, so they live or go as a pair.
- One head width per layer: if the union of the heads' live dims is no wider than the widest head, every
  head keeps that union (one RoPE table for all heads); otherwise each head keeps its own live dims,
  topped up to the widest with its own dead ones (their contribution is zero, so this is exact).
- The residual stream keeps its width. q, k and v read one shared gather of the columns open in any of
  them (gate and up likewise); o_proj and down_proj rows scatter into it. Both happen only where at least
  MIN_DEAD of the width is dead: below that the gather costs more than the narrower matmul saves, and
  the dead columns or rows are stored as zeros.
- Layout for speed (exact, it only keeps dead units or rows as padding): the scattered rows are topped
  up to a multiple of ROW_ALIGN (CPU GEMMs run up to 1.4x slower on row counts that are not), the kept
  MLP units to a multiple of UNIT_ALIGN (the same, and the activation of a row of units then runs wholly
  in its vector loop, which rounds as the dense model's does; a scalar tail rounds silu differently).
  q, k and v get one stored width (unequal widths send scaled_dot_product_attention from its fused
  kernel to another path that rounds differently): where the wider of q/k and v keeps more than
  7/8 of the head, both keep the whole head (dead dims as exact padding: the attention is then the dense
  model's, bit for bit); else q/k are topped up with dead pairs where v is wider, and v with zero rows
  where it is narrower (sliced off the attention's output before o_proj, which reads only the live dims).
"""
from dataclasses import dataclass

import torch

from .. import architectures as archs
from ..errors import ConfigError

MIN_DEAD = 0.05
NEAR_FULL = 8  # q/k or v keeping more than all but 1/NEAR_FULL of the head width keep all of it
ROW_ALIGN = 16
UNIT_ALIGN = 32  # MLP units: GEMM-aligned, and the activation's vector loop (2 x 16 floats) covers every unit
ALIGN_FROM = 256  # widths below this (test-sized models) are not padded: their GEMMs cost little either way


@dataclass
class LayerPlan:
    head_dim: int
    rope: bool
    heads: list[int]               # kept query heads, grouped by kept kv head
    kv_heads: list[int]            # kept kv heads
    qk: list[list[int]]            # per kept kv head: stored q/k dims within the head (RoPE: pairs, then partners)
    v: list[list[int]]             # per kept kv head: stored value dims within the head
    ffn: list[int]                 # kept MLP hidden units
    att_cols: list[int] | None     # residual columns q, k, v read (None: all, no gather)
    ffn_cols: list[int] | None     # residual columns gate/up (intermediate) read
    o_rows: list[int] | None       # residual rows o_proj writes (None: all, no scatter)
    down_rows: list[int] | None
    v_pad: int = 0                 # zero rows after each kv head's value dims (stored width m_qk), trimmed before o_proj

    @property
    def m_qk(self) -> int:
        return len(self.qk[0])

    @property
    def m_v(self) -> int:
        return len(self.v[0])

    @property
    def shared(self) -> bool:
        """Every kept kv head stores the same q/k dims: one RoPE table for the layer."""
        return all(d == self.qk[0] for d in self.qk)

    def group(self) -> int:
        return len(self.heads) // len(self.kv_heads)

    def q_rows(self) -> list[int]:
        g = self.group()
        return [h * self.head_dim + d for i, h in enumerate(self.heads) for d in self.qk[i // g]]

    def k_rows(self) -> list[int]:
        return [kv * self.head_dim + d for j, kv in enumerate(self.kv_heads) for d in self.qk[j]]

    def v_rows(self) -> list[int]:
        return [kv * self.head_dim + d for j, kv in enumerate(self.kv_heads) for d in self.v[j]]

    def o_cols(self) -> list[int]:
        g = self.group()
        return [h * self.head_dim + d for i, h in enumerate(self.heads) for d in self.v[i // g]]

    def qkv_pad(self) -> int:
        """Zero rows that top the fused q/k/v matmul up to a multiple of ROW_ALIGN (real-sized models)."""
        n = len(self.q_rows()) + len(self.k_rows()) + len(self.kv_heads) * (self.m_v + self.v_pad)
        return (-n) % ROW_ALIGN if n >= ALIGN_FROM else 0

    def rows_cols(self, role: str, n_out: int, n_in: int) -> tuple[list[int], list[int]]:
        """The stored rows and columns of one role's weight (indices into the dense weight)."""
        every = lambda n: list(range(n))  # noqa: E731
        if role in ("q", "k", "v"):
            rows = {"q": self.q_rows, "k": self.k_rows, "v": self.v_rows}[role]()
            return rows, self.att_cols if self.att_cols is not None else every(n_in)
        if role == "o":
            return self.o_rows if self.o_rows is not None else every(n_out), self.o_cols()
        if role in ("ffn_gate", "ffn_up"):
            return self.ffn, self.ffn_cols if self.ffn_cols is not None else every(n_in)
        if role == "ffn_down":
            return self.down_rows if self.down_rows is not None else every(n_out), self.ffn
        raise KeyError(role)

    def stored(self, role: str, n_out: int, n_in: int) -> int:
        """Weight elements stored for one role, padding included (v: its zero rows and the q/k/v alignment's)."""
        rows, cols = self.rows_cols(role, n_out, n_in)
        extra = len(self.kv_heads) * self.v_pad + self.qkv_pad() if role == "v" else 0
        return (len(rows) + extra) * len(cols)


def _open(g: torch.Tensor) -> torch.Tensor:
    return g > 0


def _where(t: torch.Tensor) -> list[int]:
    return torch.nonzero(t).flatten().tolist()


def _aligned(keep: list[int], n: int, align: int = ROW_ALIGN) -> list[int]:
    """`keep` topped up with the lowest other indices below n to a multiple of `align` (or to n)."""
    if n < ALIGN_FROM:
        return keep
    want = min(n, -(-len(keep) // align) * align)
    chosen = set(keep)
    return sorted(keep + [i for i in range(n) if i not in chosen][:want - len(keep)])


def _residual(open_: torch.Tensor, align: bool = False) -> list[int] | None:
    """The open positions of a residual-width vector, or None where too few are dead to pay a gather."""
    dead = int((~open_).sum())
    if dead < MIN_DEAD * open_.numel():
        return None
    return _aligned(_where(open_), open_.numel()) if align else _where(open_)


def _widths(live: list[list[int]], width: int, at_least: int = 1) -> list[list[int]]:
    """One width for every head: the union of the live dims if no wider than the widest head, else each
    head's live dims topped up with its own dead dims (lowest first)."""
    m = min(width, max(at_least, max(len(d) for d in live)))
    union = sorted(set().union(*live))
    if len(union) == m:
        return [union for _ in live]
    return [sorted(d + [x for x in range(width) if x not in set(d)][:m - len(d)]) for d in live]


def layer_plan(arch: archs.Arch, n: int, kv: int, hd: int, gates: dict) -> LayerPlan:
    """gates: role -> (row gates, column gates) for every role of the block (ones where not gated)."""
    group = n // kv
    q = _open(gates["q"][0]).view(n, hd)
    k = _open(gates["k"][0]).view(kv, hd)
    v = _open(gates["v"][0]).view(kv, hd)
    o_cols = _open(gates["o"][1]).view(n, hd)
    head_live = (v.repeat_interleave(group, 0) & o_cols).any(1)  # some value dim reaches the output
    live = {g: [h for h in range(g * group, (g + 1) * group) if head_live[h]] for g in range(kv)}
    kept_kv = [g for g in range(kv) if live[g]] or [0]       # a layer with no live head keeps one (zero) head
    per = max(1, max(len(live[g]) for g in kept_kv))
    heads = []
    for g in kept_kv:  # top each group up to `per` with its dead heads: their output is zero
        members = live[g] + [h for h in range(g * group, (g + 1) * group) if h not in live[g]]
        heads += members[:per]
    half = hd // 2
    qk_live, v_live = [], []
    for g in kept_kv:
        hs = live[g] or [g * group]
        q_any = q[hs].any(0)
        o_any = o_cols[hs].any(0)
        if arch.rope:
            pair = lambda t: t[:half] | t[half:]  # noqa: E731  a pair lives if either dim does
            qk_live.append(_where(pair(k[g]) & pair(q_any)))
        else:
            qk_live.append(_where(k[g] & q_any))
        v_live.append(_where(v[g] & o_any))
    m_qk = max(1, max(len(d) for d in qk_live)) * (2 if arch.rope else 1)
    m_v = max(1, max(len(d) for d in v_live))
    v_pad = 0
    if n * hd >= ALIGN_FROM:  # one stored width for q, k and v: SDPA's fused kernel, as in the dense model
        if max(m_qk, m_v) >= hd - hd // NEAR_FULL:  # near full: keep the dense width (bit for bit the dense attention)
            m_qk = m_v = hd
        else:
            m_qk = max(m_qk, m_v + m_v % 2 * arch.rope)  # q/k topped up with dead pairs where v is wider
            v_pad = m_qk - m_v                            # v padded with zero rows, trimmed before o_proj
    qk = _widths(qk_live, half if arch.rope else hd, m_qk // 2 if arch.rope else m_qk)
    if arch.rope:
        qk = [p + [d + half for d in p] for p in qk]
    unit = _open(gates["ffn_up"][0]) & _open(gates["ffn_down"][1])
    reads = _open(gates["ffn_up"][1])
    if arch.ffn_gate:
        unit &= _open(gates["ffn_gate"][0])
        reads = reads | _open(gates["ffn_gate"][1])
    # a dead unit is exact padding: its up or down weights are 0
    ffn = _aligned(_where(unit) or [0], unit.numel(), UNIT_ALIGN)
    return LayerPlan(
        head_dim=hd, rope=arch.rope, heads=heads, kv_heads=kept_kv, qk=qk, v=_widths(v_live, hd, m_v), ffn=ffn,
        att_cols=_residual(_open(gates["q"][1]) | _open(gates["k"][1]) | _open(gates["v"][1])),
        ffn_cols=_residual(reads), o_rows=_residual(_open(gates["o"][0]), align=True), v_pad=v_pad,
        down_rows=_residual(_open(gates["ffn_down"][0]), align=True))


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


def check_model(model) -> None:
    if not archs.compressible(model):
        raise ConfigError(f"compression supports {', '.join(archs.compressible_types())} models, not "
                          f"{archs.model_type(model)}")


def plans(method) -> list[LayerPlan]:
    check_model(method.model_ref)
    n, kv, hd = archs.heads(method.model_ref)
    gates = method.eval_gates()
    return [layer_plan(method.arch, n, kv, hd, block_gates(method, gates, i))
            for i in range(len(archs.blocks(method.model_ref)))]


def plan_counts(method) -> dict:
    """Weight elements the compressor removes from the block Linears (its fusion and layout rules: what
    is physically gone), as shares of the gated weights, of the non-embedding Linear weights and of the model."""
    ps = plans(method)
    arch, blocks = method.arch, archs.blocks(method.model_ref)
    gated = sum(m.weight.numel() for m in method.linears.values())
    removed = 0
    for plan, block in zip(ps, blocks):
        for role in arch.roles:
            m = archs.get(block, arch.path(role))
            removed += m.out_features * m.in_features - plan.stored(role, m.out_features, m.in_features)
    return {"removed_cascade": removed, "sparsity_cascade_gated": removed / gated,
            "sparsity_cascade_linear": removed / method.linear_weights,
            "sparsity_cascade_model": removed / method.base_params}
