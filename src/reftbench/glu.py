"""LLaMA's gated FFN, down(silu(gate x) · up x), saving two tensors for backward instead of three.

Autograd keeps silu's input g, and the product's two factors silu(g) and u: three [tokens, ffn] tensors per
layer, the largest share of a LoReFT step's activations (the frozen Linears save nothing). `SiluMul` keeps
g and u and recomputes silu(g) in backward, with the same ops autograd would run (silu_backward(grad·u, g)
and grad·silu(g)), so losses and gradients are bit for bit those of the stock module. On SmolLM2-135M at
8×64 tokens that is 87 MiB less, and a step is a little faster (fewer allocations).

Only the module classes whose forward is known to be exactly `down(act(gate(x)) * up(x))` with SiLU are
switched, by giving the instance a subclass that overrides `forward` (isinstance checks, state_dict keys
and the methods' hooks on gate/up/down are unchanged).
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import architectures as archs

# transformers' MLPs whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x))
KNOWN = {"LlamaMLP", "MistralMLP", "Qwen2MLP"}


class SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        dg = torch.ops.aten.silu_backward(grad * u, g) if ctx.needs_input_grad[0] else None
        du = grad * F.silu(g) if ctx.needs_input_grad[1] else None
        return dg, du


class LeanGLU:
    """Mixed in before the model's own MLP class."""

    def forward(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
            return self.down_proj(SiluMul.apply(g, u))
        return self.down_proj(self.act_fn(g) * u)


_classes: dict[type, type] = {}


def _lean_class(cls: type) -> type:
    if cls not in _classes:
        _classes[cls] = type(cls.__name__, (LeanGLU, cls), {"__module__": __name__})
    return _classes[cls]


def _silu(act) -> bool:
    return isinstance(act, nn.SiLU) or (type(act).__name__ == "SiLUActivation"
                                        and type(act).forward.__qualname__ == "SiLUActivation.forward")


def lean_mlps(model: nn.Module) -> int:
    """Switch every known SiLU-gated FFN of the model to `LeanGLU`; returns how many were switched."""
    arch = archs.for_model(model)
    if not arch.ffn_gate:
        return 0
    mlp_path = arch.ffn_gate.rsplit(".", 1)[0]
    n = 0
    for block in archs.blocks(model):
        mlp = archs.get(block, mlp_path)
        cls = type(mlp)
        if isinstance(mlp, LeanGLU):
            n += 1
        elif cls.__name__ in KNOWN and _silu(getattr(mlp, "act_fn", None)):
            mlp.__class__ = _lean_class(cls)
            n += 1
    return n
