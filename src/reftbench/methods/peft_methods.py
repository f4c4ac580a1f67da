"""LoRA and DoRA through peft, injected in place so the model keeps its class and attribute paths.

LoRA   W x + (alpha / r) · B A x,  A ∈ ℝ^{r×in} (Kaiming-uniform), B ∈ ℝ^{out×r} (zeros)
DoRA   m ⊙ (W + (alpha / r) B A) x / ||W + (alpha / r) B A||_row,  m initialised to ||W||_row; the norm
       is detached from the gradient as the DoRA paper (section 4.3) suggests (peft does this)

Both start as the identity edit (B = 0). Adapters go into the backbone only: never the LM head
nor a classification head.
"""
from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from ..errors import ConfigError
from .. import architectures as archs
from ..architectures import backbone
from .base import Method, MethodConfig, register

ADAPTER = "default"


@dataclass
class LoraMethodConfig(MethodConfig):
    rank: int = 32
    alpha: float = 64
    dropout: float = 0.05
    target_modules: object = "auto"


def resolve_targets(spec, model: nn.Module) -> list[str]:
    """`auto`: the modules the paper's baselines adapt, from the architecture table (LLaMA: LLM-Adapters'
    LoRA setting that ReFT Table 1 quotes; BERT/RoBERTa: the LoRA paper's GLUE setting, query and value)."""
    return list(archs.for_model(model).lora_targets) if spec == "auto" else parse_targets(spec)


def parse_targets(spec) -> list[str]:
    if isinstance(spec, str):
        spec = spec.replace(",", ";").split(";")
    try:
        out = [str(s).strip() for s in spec if str(s).strip()]
    except TypeError:
        out = []
    if not out:
        raise ConfigError(f"intervention.target_modules={spec!r} is empty or malformed: use a list or a string like q_proj;v_proj")
    return list(dict.fromkeys(out))


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _linear_names(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in backbone(model).named_modules() if isinstance(m, nn.Linear)}


class Lora(Method):
    use_dora = False

    @classmethod
    def check(cls, config: LoraMethodConfig, model: nn.Module) -> None:
        archs.for_model(model)  # an architecture the table does not know: one clear line
        if not isinstance(config.rank, int) or isinstance(config.rank, bool) or config.rank < 1:
            raise ConfigError(f"intervention.rank={config.rank} is out of range: use a positive integer")
        if not (_number(config.alpha) and config.alpha > 0):
            raise ConfigError(f"intervention.alpha={config.alpha} must be a positive number")
        if not (_number(config.dropout) and 0.0 <= config.dropout < 1.0):
            raise ConfigError(f"intervention.dropout={config.dropout} is out of range: use 0 <= p < 1")
        have = _linear_names(model)
        missing = [t for t in resolve_targets(config.target_modules, model) if t not in have]
        if missing:
            raise ConfigError(f"intervention.target_modules has {missing[0]!r}, but the model has no Linear layer "
                              f"of that name; it has {', '.join(sorted(have))}")

    def __init__(self, config: LoraMethodConfig, model: nn.Module):
        super().__init__(config, model)  # counts the base before the adapters exist
        config.target_modules = resolve_targets(config.target_modules, model)  # saved as the names used
        peft_config = LoraConfig(r=config.rank, lora_alpha=float(config.alpha), lora_dropout=float(config.dropout),
                                 target_modules=config.target_modules, use_dora=self.use_dora,
                                 bias="none")
        bb = backbone(model)
        inject_adapter_in_model(peft_config, bb, adapter_name=ADAPTER)
        self._peft_root = (bb, peft_prefix(model, bb))  # a tuple: not a submodule (peft-format saving)
        # The adapted layers' own weights stay out of the method; the small modules peft added are
        # held here too, so state_dict() is exactly the adapter weights and train() reaches the dropout.
        self._wrapped = []  # plain list: not submodules, the base weights must not enter state_dict
        adapters = {}
        for name, m in bb.named_modules():
            if isinstance(m, LoraLayer):
                parts = {"A": m.lora_A[ADAPTER], "B": m.lora_B[ADAPTER], "dropout": m.lora_dropout[ADAPTER]}
                if self.use_dora:
                    parts["magnitude"] = m.lora_magnitude_vector[ADAPTER]
                adapters[name.replace(".", "-")] = nn.ModuleDict(parts)
                self._wrapped.append(m)
                m.eval()  # peft builds its modules in training mode; the model was in eval mode
        self.adapters = nn.ModuleDict(adapters)
        self.train(False)

    def train(self, mode: bool = True):
        super().train(mode)
        # DoRA applies dropout only when the wrapping layer is in training mode; flip just that flag
        # (not its children) so the base model itself stays in eval mode.
        for m in self._wrapped:
            m.training = mode
        return self

    def trainable_parameters(self):
        return list(self.adapters.parameters())

    def save(self, path) -> None:
        super().save(path)  # our own format (method.json, weights.safetensors): methods.load reads it
        save_peft(self, path)  # and peft's, beside it: PeftModel.from_pretrained(base, path) reads that

    def added_parameters(self) -> int:
        return sum(p.numel() for p in self.adapters.parameters())


@register("lora", LoraMethodConfig)
class LoraMethod(Lora):
    use_dora = False


@register("dora", LoraMethodConfig)
class DoraMethod(Lora):
    use_dora = True


# ---- peft's own format -----------------------------------------------------------------------------
# adapter_config.json + adapter_model.safetensors, as PeftModel.save_pretrained writes them, so that
# `PeftModel.from_pretrained(base_model, folder)` rebuilds the same adapted model. The adapters sit in the
# backbone; peft wraps the whole model, so names are the full model's under `base_model.model.`.

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def peft_prefix(model: nn.Module, bb: nn.Module) -> str:
    name = next((n for n, m in model.named_modules() if m is bb), "")
    return f"{name}." if name else ""


def peft_files(method: Lora) -> tuple[LoraConfig, dict]:
    """The adapter's config and state dict in peft's naming. target_modules lists the adapted layers
    by their full names, so peft adapts exactly these (never a head layer of the same short name)."""
    import copy
    from peft import get_peft_model_state_dict
    bb, prefix = method._peft_root
    config = copy.deepcopy(bb.peft_config[ADAPTER])
    config.target_modules = sorted(prefix + n for n, m in bb.named_modules() if isinstance(m, LoraLayer))
    config.inference_mode = True
    state = get_peft_model_state_dict(bb, adapter_name=ADAPTER)
    return config, {f"base_model.model.{prefix}{k}": v.detach().contiguous() for k, v in state.items()}


def save_peft(method: Lora, path) -> None:
    import json
    from safetensors.torch import save_file
    from ..atomic import atomic_path
    config, state = peft_files(method)
    with atomic_path(Path(path) / PEFT_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    with atomic_path(Path(path) / PEFT_CONFIG) as tmp:
        tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list) + "\n")
