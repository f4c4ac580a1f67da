"""The layers of a compressed model: a Linear that stores only its live rows and columns, and attention
whose heads are narrower than head_dim (q/k and v widths may differ; the original 1/√head_dim scale is kept).
"""
import torch
import torch.nn.functional as F
from torch import nn


class CompactLinear(nn.Module):
    """y = scatter_out(W' · gather_in(x) + b'). `in_index` gathers live columns of a full-width input
    (residual readers); `out_index` scatters live rows into a full-width output (residual writers)."""

    def __init__(self, rows: int, cols: int, bias: bool, in_index: int | None, out_index: int | None,
                 in_features: int, out_features: int, dtype=torch.float32, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, cols, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(rows, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.register_buffer("in_index", None if in_index is None else torch.zeros(in_index, dtype=torch.long))
        self.register_buffer("out_index", None if out_index is None else torch.zeros(out_index, dtype=torch.long))
        self.in_features, self.out_features = in_features, out_features

    def spec(self) -> dict:
        return {"rows": self.weight.shape[0], "cols": self.weight.shape[1], "bias": self.bias is not None,
                "in_index": None if self.in_index is None else len(self.in_index),
                "out_index": None if self.out_index is None else len(self.out_index),
                "in_features": self.in_features, "out_features": self.out_features}

    @classmethod
    def from_spec(cls, spec: dict, dtype) -> "CompactLinear":
        return cls(spec["rows"], spec["cols"], spec["bias"], spec["in_index"], spec["out_index"],
                   spec["in_features"], spec["out_features"], dtype=dtype)

    def forward(self, x):
        if self.in_index is not None:
            x = x.index_select(-1, self.in_index)
        y = F.linear(x, self.weight, self.bias)
        if self.out_index is not None:
            y = y.new_zeros(*y.shape[:-1], self.out_features).index_copy_(y.dim() - 1, self.out_index, y)
        return y


def _interface(module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, eager_attention_forward)


class CompactAttention(nn.Module):
    """Self-attention over compact heads: q/k heads of width m_qk, v heads of width m_v.

    decoder=True replaces LLaMA's `self_attn` (RoPE on the kept rotary pairs via `rope_index`, a KV
    cache, o_proj inside); decoder=False replaces BERT's `attention.self` (its output dense stays outside).
    """

    def __init__(self, config, layer_idx: int, heads: int, kv_heads: int, m_qk: int, m_v: int, scaling: float,
                 rope: bool, projections: dict, decoder: bool):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.heads, self.kv_heads, self.m_qk, self.m_v = heads, kv_heads, m_qk, m_v
        self.num_key_value_groups = heads // kv_heads
        self.scaling, self.is_causal, self.decoder = scaling, decoder, decoder
        self.attention_dropout = 0.0
        self.names = {r: n for r, n in zip(("q", "k", "v", "o"), ("q_proj", "k_proj", "v_proj", "o_proj"))} \
            if decoder else {"q": "query", "k": "key", "v": "value"}
        for role, name in self.names.items():
            setattr(self, name, projections[role])
        self.register_buffer("rope_index", torch.zeros(kv_heads * m_qk, dtype=torch.long) if rope else None)

    def _proj(self, role, x, heads, width):
        b, t = x.shape[:2]
        return getattr(self, self.names[role])(x).view(b, t, heads, width).transpose(1, 2)

    def _rope(self, q, k, cos, sin):
        idx = self.rope_index.view(self.kv_heads, self.m_qk)
        cos_k = cos[..., idx].permute(0, 2, 1, 3)  # (b, t, kv, m) -> (b, kv, t, m)
        sin_k = sin[..., idx].permute(0, 2, 1, 3)
        cos_q = cos_k.repeat_interleave(self.num_key_value_groups, dim=1)
        sin_q = sin_k.repeat_interleave(self.num_key_value_groups, dim=1)

        def rotate_half(x):
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((-x2, x1), dim=-1)
        return q * cos_q + rotate_half(q) * sin_q, k * cos_k + rotate_half(k) * sin_k

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        kwargs.pop("encoder_hidden_states", None)
        kwargs.pop("position_ids", None)
        kwargs.pop("use_cache", None)
        cache = cache if cache is not None else past_key_values
        b, t = hidden_states.shape[:2]
        q = self._proj("q", hidden_states, self.heads, self.m_qk)
        k = self._proj("k", hidden_states, self.kv_heads, self.m_qk)
        v = self._proj("v", hidden_states, self.kv_heads, self.m_v)
        if self.rope_index is not None:
            q, k = self._rope(q, k, *position_embeddings)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        out, weights = _interface(self)(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        out = out.reshape(b, t, -1).contiguous()
        if self.decoder:
            out = self.o_proj(out)
        return out, weights
