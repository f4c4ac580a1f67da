"""One precision policy for every method (`trainer.precision`).

fp32        everything in the model's own dtype (float32, or float64 in tests), no autocast
bf16-mixed  trainable parameters and optimiser state in fp32, forward and backward under bf16 autocast
fp16-mixed  the same under fp16 autocast, with loss scaling (a GPU only)
auto        bf16-mixed for a bfloat16 model, fp32 for a float32 (or float64) one

The frozen base weights keep the model's dtype (bf16 weights stay bf16: that is the memory saving).
What trains is upcast to fp32 whatever the method (LoRA/DoRA adapters, which peft creates in the base
layer's dtype; full finetuning's and BitFit's base tensors, which become fp32 master weights; a
classification head), so no method takes steps that round away in bf16.
"""
import torch
from torch import nn

from .errors import ConfigError

POLICIES = ("auto", "fp32", "bf16-mixed", "fp16-mixed")
ACCELERATE = {"fp32": "no", "bf16-mixed": "bf16", "fp16-mixed": "fp16"}  # accelerate's mixed_precision
LOW = (torch.bfloat16, torch.float16)


def resolve(precision: str, model_dtype: str) -> str:
    """The policy a run uses, from `trainer.precision` and `model.dtype` (names as in the config)."""
    if precision not in POLICIES:
        raise ConfigError(f"trainer.precision={precision!r} is unknown: use {', '.join(POLICIES)}")
    if model_dtype == "float16" and precision != "fp16-mixed":
        raise ConfigError("model.dtype=float16 underflows without loss scaling: use trainer.precision=fp16-mixed "
                          "(a GPU), or model.dtype=bfloat16")
    if precision == "auto":
        return "bf16-mixed" if model_dtype == "bfloat16" else "fp32"
    if precision == "fp32" and model_dtype in ("bfloat16", "float16"):
        raise ConfigError(f"trainer.precision=fp32 with model.dtype={model_dtype} would train in pure {model_dtype}: "
                          "use trainer.precision=bf16-mixed, or model.dtype=float32")
    return precision


def upcast_trainable(params, policy: str, model: nn.Module | None = None) -> None:
    """Under a mixed policy, every trainable tensor held in bf16/fp16 becomes an fp32 parameter (in
    place: the Parameter object, and any tying, stays the same). A module other than a Linear (whose
    inputs autocast casts) computes with all its tensors in one dtype (LayerNorm: weight and bias), so
    a frozen tensor beside a trainable one (BitFit's LayerNorm weight) is upcast with it."""
    if policy == "fp32":
        return
    params = list(params)
    for p in params:
        if p.dtype in LOW:
            p.data = p.data.float()
    trained = {id(p) for p in params}
    for m in (model.modules() if model is not None else ()):
        own = list(m.parameters(recurse=False))
        if isinstance(m, nn.Linear) or not any(id(p) in trained for p in own):
            continue
        for p in own:
            if p.dtype in LOW:
                p.data = p.data.float()


def dtypes(groups: dict) -> dict:
    """{"method": {"float32": n_tensors}, "head": {...}}: what result.json records."""
    out = {}
    for name, params in groups.items():
        counts = {}
        for p in params:
            key = str(p.dtype).removeprefix("torch.")
            counts[key] = counts.get(key, 0) + 1
        if counts:
            out[name] = counts
    return out
