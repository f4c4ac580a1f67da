"""BitFit (Ben Zaken et al. 2022): only the base model's bias terms train (linear and LayerNorm).

Like `full`, the method registers the model's own bias Parameters, so its state is exactly them.
"""
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..architectures import for_model, model_type
from .base import MethodConfig, register
from .full import BaseWeightsMethod, body_parameters


@dataclass
class BitFitConfig(MethodConfig):
    pass


def biases(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in body_parameters(model).items() if n.rsplit(".", 1)[-1] == "bias"}


@register("bitfit", BitFitConfig)
class BitFitMethod(BaseWeightsMethod):
    @classmethod
    def check(cls, config: BitFitConfig, model: nn.Module) -> None:
        for_model(model)  # an architecture the table does not know: one clear line
        if not biases(model):
            raise ConfigError(f"intervention=bitfit trains only bias terms, but this {model_type(model)} model has no "
                              "bias terms (Llama-style models are built without them): use another method")

    @classmethod
    def select(cls, model):
        return biases(model)
