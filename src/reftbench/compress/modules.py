"""The layers of a compressed model: Linears that store only their live rows and columns, q/k/v and gate/up
each fused into one matmul behind one shared gather, and attention over the kept heads at a per-layer
head width (the original 1/√head_dim scale is kept). Everything that depends on the gates (indices, the
RoPE dim table) is built once, when the layer is made.
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward


BLOCK_CANDIDATES = (192, 128, 256, 96, 64, 384, 512, 32, 48, 16)
BLOCK_ROWS = (8, 16, 32)  # the fewest input rows from which the BLAS sums in blocks, tried in turn
_BLOCKS: dict = {}


def _blocked(x2, w, bias, bounds):
    """x2 · wᵀ (+ bias) summed block by block: one matmul per (start, end) of stored columns, accumulated in order."""
    (s, e), rest = bounds[0], bounds[1:]
    y = F.linear(x2[:, s:e], w[:, s:e], bias)
    for s, e in rest:
        y.addmm_(x2[:, s:e], w[:, s:e].t())
    return y


def _bounds(origin: list[int], kc: int) -> list[tuple[int, int]]:
    """Stored columns (original indices `origin`, ascending) split where the original index crosses a multiple of kc."""
    out, start = [], 0
    for i in range(1, len(origin) + 1):
        if i == len(origin) or origin[i] // kc != origin[i - 1] // kc:
            out.append((start, i))
            start = i
    return out


def _candidates(k: int) -> list[int]:
    """Block sizes to try: the usual ones, then the width split into 2..16 equal parts (MKL on AVX-512 was
    seen to sum a 1536-wide input in 4 blocks of 384 and a 576-wide one in 2 of 288)."""
    out = []
    for kc in BLOCK_CANDIDATES + tuple(-(-k // j) for j in range(2, 17)):
        if kc < k and kc not in out:
            out.append(kc)
    return out


def dense_block(n: int, k: int, bias: bool, dtype) -> tuple[int, int] | None:
    """The block of input columns this machine's BLAS sums on its own for an (n × k) weight, and the fewest
    input rows from which it does: (kc, rows) such that a matmul over any subset of the columns, split at the
    multiples of kc and accumulated block by block, equals the full matmul with the other columns zero, bit
    for bit (tried on random data at `rows` and at 64 rows; cached per shape and thread count). None where
    no candidate does (the plain matmul is used then)."""
    key = (n, k, bias, dtype, torch.get_num_threads())
    if key not in _BLOCKS:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=g).to(dtype)
        b = torch.randn(n, generator=g).to(dtype) if bias else None
        keep = torch.nonzero(torch.rand(k, generator=g) >= 0.35).flatten()
        wk, found = w.index_select(1, keep).contiguous(), None

        def agrees(m, kc):
            x = torch.zeros(m, k, dtype=dtype)
            x[:, keep] = torch.randn(m, len(keep), generator=torch.Generator().manual_seed(m)).to(dtype)
            return torch.equal(F.linear(x, w, b), _blocked(x.index_select(1, keep), wk, b, _bounds(keep.tolist(), kc)))

        with torch.inference_mode():
            for rows in BLOCK_ROWS:
                kc = next((kc for kc in _candidates(k) if agrees(rows, kc) and agrees(64, kc)), None)
                if kc:
                    found = kc, rows
                    break
        _BLOCKS[key] = found
    return _BLOCKS[key]


class CompactLinear(nn.Module):
    """y = scatter_out(W' · gather_in(x) + b'). `in_index` gathers live columns of a full-width input
    (residual readers); `out_index` scatters live rows into a full-width output (residual writers).
    `origin` (a reader whose input lost columns: o_proj, down_proj, gathered q/k/v and gate/up): the stored
    columns' indices in the dense weight (`dense_in` wide). With it, inputs of at least as many rows as the BLAS
    sums in blocks from (8 or 16 seen) are multiplied in the blocks of columns the BLAS sums for the dense
    weight (`dense_block`), so the sums are rounded as the dense model's are: the same fp32 result, bit for
    bit, with the dead columns skipped."""

    def __init__(self, rows: int, cols: int, bias: bool, in_index: int | None, out_index: int | None,
                 in_features: int, out_features: int, dtype=torch.float32, device=None,
                 origin: int | None = None, dense_in: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, cols, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(rows, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.register_buffer("in_index", None if in_index is None else torch.zeros(in_index, dtype=torch.long))
        self.register_buffer("out_index", None if out_index is None else torch.zeros(out_index, dtype=torch.long))
        self.register_buffer("origin", None if origin is None else torch.zeros(origin, dtype=torch.long))
        self.in_features, self.out_features, self.dense_in = in_features, out_features, dense_in
        self._blocks = None  # [(start, end)] once known; () for none

    def spec(self) -> dict:
        return {"rows": self.weight.shape[0], "cols": self.weight.shape[1], "bias": self.bias is not None,
                "in_index": None if self.in_index is None else len(self.in_index),
                "out_index": None if self.out_index is None else len(self.out_index),
                "in_features": self.in_features, "out_features": self.out_features,
                "origin": None if self.origin is None else len(self.origin), "dense_in": self.dense_in}

    @classmethod
    def from_spec(cls, spec: dict, dtype) -> "CompactLinear":
        return cls(spec["rows"], spec["cols"], spec["bias"], spec["in_index"], spec["out_index"],
                   spec["in_features"], spec["out_features"], dtype=dtype, origin=spec.get("origin"),
                   dense_in=spec.get("dense_in"))

    def blocks(self) -> tuple:
        """The (start, end) column blocks to multiply in; () for one plain matmul."""
        return self._block_plan()[0]

    def _block_plan(self) -> tuple[tuple, int]:
        key = (self.weight.dtype, self.weight.device, torch.get_num_threads())
        if self._blocks is None or self._blocks[0] != key:
            found = None
            if self.origin is not None and self.weight.device.type == "cpu":
                n = self.out_features if self.out_index is not None else self.weight.shape[0]
                found = dense_block(n, self.dense_in, self.bias is not None, self.weight.dtype)
            bounds = _bounds(self.origin.tolist(), found[0]) if found else []
            self._blocks = key, ((tuple(bounds), found[1]) if len(bounds) > 1 else ((), 0))
        return self._blocks[1]

    def rows(self, x):
        """The stored rows' outputs (no scatter)."""
        if self.in_index is not None:
            x = x.index_select(-1, self.in_index)
        if self.origin is not None and x.numel() >= BLOCK_ROWS[0] * x.shape[-1]:
            blocks, fewest = self._block_plan()
            if blocks and x.numel() >= fewest * x.shape[-1]:
                return _blocked(x.reshape(-1, x.shape[-1]), self.weight, self.bias, blocks).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x):
        y = self.rows(x)
        if self.out_index is not None:
            y = y.new_zeros(*y.shape[:-1], self.out_features).index_copy_(y.dim() - 1, self.out_index, y)
        return y

    def add_to(self, residual, x):
        """residual + forward(x), the scatter fused into the add (the same sums: a dead row adds nothing)."""
        y = self.rows(x)
        return residual + y if self.out_index is None else residual.index_add(-1, self.out_index, y)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class CompactAttention(nn.Module):
    """Self-attention over the kept heads: q/k heads of width m_qk, v heads of width m_v (stored with v_pad
    zero rows after each head's dims, sliced off the output: equal widths keep SDPA on its fused kernel),
    q, k and v from one matmul (`qkv`).

    decoder=True replaces LLaMA's `self_attn` (RoPE on the kept rotary pairs, a KV cache, o_proj inside);
    decoder=False replaces BERT's `attention.self` (its output dense stays outside).
    rope: None (no RoPE), "full" (every dim kept: the model's tables as they are), "shared" (one dim table
    for all heads, `rope_index` of shape (m_qk,)) or "per_head" (`rope_index` of shape (kv_heads, m_qk)).
    """

    def __init__(self, config, layer_idx: int, heads: int, kv_heads: int, m_qk: int, m_v: int, scaling: float,
                 rope: str | None, qkv: CompactLinear, o_proj: CompactLinear | None, decoder: bool, v_pad: int = 0):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.heads, self.kv_heads, self.m_qk, self.m_v, self.v_pad = heads, kv_heads, m_qk, m_v, v_pad
        self.num_key_value_groups = heads // kv_heads
        self.scaling, self.is_causal, self.decoder = scaling, decoder, decoder
        self.attention_dropout = 0.0
        self.sizes = (heads * m_qk, kv_heads * m_qk, kv_heads * (m_v + v_pad))
        extra = qkv.weight.shape[0] - sum(self.sizes)  # zero rows that align the fused GEMM
        self.split = self.sizes + ((extra,) if extra else ())
        self.split_qk = (self.sizes[0] + self.sizes[1],) + self.split[2:]  # [q; k] | v | alignment rows
        self.qkv, self.rope = qkv, rope
        if decoder:
            self.o_proj = o_proj
        shape = {"shared": (m_qk,), "per_head": (kv_heads, m_qk)}.get(rope)
        self.register_buffer("rope_index", None if shape is None else torch.zeros(shape, dtype=torch.long))
        self.attend = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)

    def spec(self) -> dict:
        return {"heads": self.heads, "kv_heads": self.kv_heads, "m_qk": self.m_qk, "m_v": self.m_v, "v_pad": self.v_pad,
                "scaling": self.scaling, "rope": self.rope, "qkv": self.qkv.spec(),
                "o_proj": self.o_proj.spec() if self.decoder else None}

    def _rope(self, q, k, cos, sin):
        if self.rope == "full":
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        elif self.rope == "shared":
            cos, sin = cos.index_select(-1, self.rope_index).unsqueeze(1), sin.index_select(-1, self.rope_index).unsqueeze(1)
        else:  # (b, t, kv, m) -> (b, kv, t, m); a group's query heads broadcast over their kv head's table
            b, h, t, m = q.shape
            flat = self.rope_index.view(-1)
            cos = cos.index_select(-1, flat).view(*cos.shape[:-1], self.kv_heads, m).transpose(1, 2)
            sin = sin.index_select(-1, flat).view(*sin.shape[:-1], self.kv_heads, m).transpose(1, 2)
            qg = q.view(b, self.kv_heads, self.num_key_value_groups, t, m)
            qg = qg * cos.unsqueeze(2) + rotate_half(qg) * sin.unsqueeze(2)
            return qg.view(b, h, t, m), k * cos + rotate_half(k) * sin
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        kwargs.pop("encoder_hidden_states", None)
        kwargs.pop("position_ids", None)
        kwargs.pop("use_cache", None)
        cache = cache if cache is not None else past_key_values
        out, weights = self.heads_output(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
        if self.decoder:
            out = self.o_proj(out)
        return out, weights

    def heads_output(self, hidden_states, position_embeddings, attention_mask, cache, **kwargs):
        """The heads' outputs, concatenated (o_proj's input) and the attention weights (None under SDPA)."""
        b, t = hidden_states.shape[:2]
        qk, v = self.qkv(hidden_states).split(self.split_qk, dim=-1)[:2]
        v = v.view(b, t, self.kv_heads, self.m_v + self.v_pad).transpose(1, 2)
        if self.rope in ("full", "shared"):  # one table for every head: q and k rotated together
            cos, sin = position_embeddings
            if self.rope == "shared":
                cos, sin = cos.index_select(-1, self.rope_index), sin.index_select(-1, self.rope_index)
            qk = qk.view(b, t, self.heads + self.kv_heads, self.m_qk).transpose(1, 2)
            qk = qk * cos.unsqueeze(1) + rotate_half(qk) * sin.unsqueeze(1)
            q, k = qk[:, :self.heads], qk[:, self.heads:]
        else:
            q, k = qk.split(self.sizes[:2], dim=-1)
            q = q.view(b, t, self.heads, self.m_qk).transpose(1, 2)
            k = k.view(b, t, self.kv_heads, self.m_qk).transpose(1, 2)
            if self.rope is not None:
                q, k = self._rope(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        out, weights = self.attend(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        if self.v_pad:  # (b, t, heads, m_v + v_pad): the zero padding goes
            out = out[..., :self.m_v]
        return out.reshape(b, t, -1).contiguous(), weights


class CompactMLP(nn.Module):
    """LLaMA's gated MLP over the kept hidden units: gate and up from one matmul (`gate_up`, rows
    [gate; up]) behind one gather, then down_proj."""

    def __init__(self, act: str, gate_up: CompactLinear, down_proj: CompactLinear):
        super().__init__()
        self.gate_up, self.down_proj = gate_up, down_proj
        self.units = down_proj.weight.shape[1]
        self.act_name, self.act_fn = act, ACT2FN[act]

    def spec(self) -> dict:
        return {"act": self.act_name, "gate_up": self.gate_up.spec(), "down_proj": self.down_proj.spec()}

    def hidden(self, x):
        gate, up = self.gate_up(x).split(self.units, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, x):
        return self.down_proj(self.hidden(x))


def _compact_decoder_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None,
                             use_cache=False, position_embeddings=None, past_key_values=None, **kwargs):
    """The decoder layer's forward, the same operations in the same order, with o_proj's and down_proj's
    scatter fused into the residual adds (and no keyword-renaming wrapper around the call)."""
    cache = cache if cache is not None else past_key_values
    kwargs.pop("output_attentions", None)
    att = self.self_attn
    heads, _ = att.heads_output(self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache,
                                **kwargs)
    hidden_states = att.o_proj.add_to(hidden_states, heads)
    return self.mlp.down_proj.add_to(hidden_states, self.mlp.hidden(self.post_attention_layernorm(hidden_states)))


_LAYER_CLASSES: dict = {}


def compact_decoder_layer(block) -> bool:
    """Give a LLaMA-family decoder layer whose attention and MLP are compact the fused forward, in place:
    its class becomes a subclass of its own (isinstance checks and output recording still see the
    original class; the parameters and their names are unchanged). False where the block is not one."""
    if not (isinstance(getattr(block, "self_attn", None), CompactAttention) and block.self_attn.decoder
            and isinstance(getattr(block, "mlp", None), CompactMLP)
            and hasattr(block, "input_layernorm") and hasattr(block, "post_attention_layernorm")):
        return False
    cls = type(block)
    if cls not in _LAYER_CLASSES.values():
        if cls not in _LAYER_CLASSES:
            _LAYER_CLASSES[cls] = type(f"Compact{cls.__name__}", (cls,), {"forward": _compact_decoder_forward,
                                                                           "__module__": __name__})
        block.__class__ = _LAYER_CLASSES[cls]
    return True
