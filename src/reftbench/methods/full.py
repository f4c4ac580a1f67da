"""Full finetuning: every base weight trains; nothing is added.

The method does not own the model (it is no submodule): it registers the model's own Parameter
objects, each once, in a ParameterDict. So state_dict() is the model's full parameter state, tied
weights (embed_tokens / lm_head) appear once, save_file never sees shared tensors, and
load_state_dict writes straight into the model.
"""
from dataclasses import dataclass

from torch import nn

from ..models import backbone, check_supported
from .base import Method, MethodConfig, register


def body(model: nn.Module) -> nn.Module:
    """The part of a model a method may train and count.

    Decoders: the whole model, LM head included. Encoders: the backbone only; the classification
    head is new, always trains, and is not counted (the paper's GLUE tables), so the task's
    classification loop must add the head's parameters to the optimiser itself.
    """
    return backbone(model) if check_supported(model) == "encoder" else model


def key(name: str) -> str:
    return name.replace(".", "-")  # parameter names may not contain dots


@dataclass
class FullConfig(MethodConfig):
    pass


@register("full", FullConfig)
class FullMethod(Method):
    @classmethod
    def check(cls, config: FullConfig, model: nn.Module) -> None:
        check_supported(model)

    def __init__(self, config: FullConfig, model: nn.Module):
        super().__init__(config, model)
        # named_parameters() yields a tied weight once, under its first name
        self.weights = nn.ParameterDict({key(n): p for n, p in body(model).named_parameters()})
        for p in self.weights.values():
            p.requires_grad_(True)

    def trainable_parameters(self):
        return list(self.weights.values())

    def added_parameters(self) -> int:
        return 0
