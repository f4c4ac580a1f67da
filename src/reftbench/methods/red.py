"""RED (Wu et al. 2024, "Advancing Parameter Efficiency in Fine-tuning via Representation Editing").

Each chosen layer's FFN output h (before the residual add) becomes  h' = s ⊙ h + b,
s ∈ ℝ^d initialised to ones, b ∈ ℝ^d to zeros, at every position: 2·d parameters per layer.
The site and initialisation follow the authors' code (github.com/mlwu22/RED): it wraps LLaMA's
mlp.down_proj and RoBERTa's `<layer>.output.dense` (the FFN, not the attention output).
"""
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..errors import ConfigError
from ..architectures import blocks as model_layers, hidden_size
from .base import Method, MethodConfig, register
from .reft import parse_layers


@dataclass
class RedConfig(MethodConfig):
    layers: object = "all"  # "all", a list of ints, or "2;10;18;26"


def ffn(block: nn.Module) -> nn.Module:
    """The module whose output is the FFN sub-layer's output in one transformer block."""
    if hasattr(block, "mlp"):  # Llama family: mlp(x) = down_proj(act(gate(x)) * up(x))
        return block.mlp
    out = getattr(block, "output", None)
    if out is not None and hasattr(out, "dense"):  # BERT/RoBERTa: dense, then dropout + residual + LayerNorm
        return out.dense
    raise ConfigError(f"cannot find the FFN of {type(block).__name__} for intervention=red")


class Edit(nn.Module):
    def __init__(self, dim: int, dtype: torch.dtype, device):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype, device=device))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h.to(self.scale.dtype) * self.scale + self.bias).to(h.dtype)


@register("red", RedConfig)
class RedMethod(Method):
    @classmethod
    def check(cls, config: RedConfig, model: nn.Module) -> None:
        blocks = model_layers(model)
        parse_layers(config.layers, len(blocks))
        ffn(blocks[0])

    def __init__(self, config: RedConfig, model: nn.Module):
        super().__init__(config, model)
        blocks = model_layers(model)
        self.layer_ids = parse_layers(config.layers, len(blocks))
        p = next(model.parameters())
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32  # low-precision models keep fp32 edits
        self.edits = nn.ModuleDict({f"layer{i}": Edit(hidden_size(model), dtype, p.device) for i in self.layer_ids})
        self._handles = [ffn(blocks[i]).register_forward_hook(partial(self._hook, i)) for i in self.layer_ids]

    def _hook(self, layer_id, module, args, output):
        return self.edits[f"layer{layer_id}"](output)  # every position, cached decode steps included

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def trainable_parameters(self):
        return list(self.edits.parameters())

    def added_parameters(self) -> int:
        return sum(p.numel() for p in self.edits.parameters())
