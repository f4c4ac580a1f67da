"""Full finetuning: every base weight trains; nothing is added.

The method does not own the model (it is no submodule): it registers the model's own Parameter
objects, each once, in a ParameterDict. So state_dict() is the model's full parameter state, tied
weights (embed_tokens / lm_head) appear once, save_file never sees shared tensors, and
load_state_dict writes straight into the model.
"""
from dataclasses import dataclass

from torch import nn

from ..architectures import backbone, for_model, kind
from .base import Method, MethodConfig, register


def body(model: nn.Module) -> nn.Module:
    """The part of a model a method may train and count.

    Decoders: the whole model, LM head included. Encoders: the backbone only; the classification
    head is new, always trains, and is not counted (the paper's GLUE tables), so the task's
    classification loop must add the head's parameters to the optimiser itself.
    """
    return backbone(model) if kind(model) == "encoder" else model


def key(name: str) -> str:
    return name.replace(".", "-")  # parameter names may not contain dots


def body_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The body's parameters; an encoder's pooler belongs to the classification head (it is what
    RoBERTa's head calls its dense layer), which the task's loop trains and nobody counts."""
    encoder = kind(model) == "encoder"
    return {n: p for n, p in body(model).named_parameters() if not (encoder and n.startswith("pooler."))}


class BaseWeightsMethod(Method):
    """Trains a subset of the base model's own weights (`select`), adding nothing."""

    @classmethod
    def select(cls, model: nn.Module) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def __init__(self, config: MethodConfig, model: nn.Module):
        super().__init__(config, model)
        self.weights = nn.ParameterDict({key(n): p for n, p in self.select(model).items()})
        for p in self.weights.values():
            p.requires_grad_(True)

    def trainable_parameters(self):
        return list(self.weights.values())

    def added_parameters(self) -> int:
        return 0


@dataclass
class FullConfig(MethodConfig):
    pass


@register("full", FullConfig)
class FullMethod(BaseWeightsMethod):
    @classmethod
    def check(cls, config: FullConfig, model: nn.Module) -> None:
        for_model(model)  # an architecture the table does not know: one clear line

    @classmethod
    def select(cls, model):
        return body_parameters(model)  # named_parameters() yields a tied weight once
