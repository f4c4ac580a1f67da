"""ReFT methods: an intervention on chosen layers' outputs at chosen prompt positions.

Native PyTorch forward hooks on each block (no pyvene): the hook gathers the selected positions,
computes the low-rank edit on those K vectors only and scatter-adds it back, so the cost is
O(K·r·d) per layer whatever the sequence length. Interventions act only on a forward pass that
starts at position 0 (training, prefill, or generation recomputed without a cache); cached decode
steps pass through untouched.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..errors import ConfigError
from ..interventions import INTERVENTIONS
from ..models import backbone, hidden_size, layers as model_layers
from ..positions import Positions
from .base import Method, MethodConfig, register


@dataclass
class ReftConfig(MethodConfig):
    rank: int = 4
    layers: object = "all"  # "all", a list of ints, or "2;10;18;26"
    positions: str = "f7+l7"
    share_weights: bool = True  # the paper's "tied": one intervention per layer for f and l
    dropout: float = 0.0


def parse_layers(spec, num_layers: int) -> list[int]:
    if isinstance(spec, str):
        s = spec.strip()
        if s == "all":
            return list(range(num_layers))
        try:
            spec = [int(x) for x in s.replace(",", ";").split(";") if x.strip()]
        except ValueError:
            raise ConfigError(f"intervention.layers={s!r} is malformed: use all, or layer numbers like 2;10;18;26") from None
    elif isinstance(spec, int):
        spec = [spec]
    try:
        out = sorted({int(x) for x in spec})
    except (TypeError, ValueError):
        raise ConfigError(f"intervention.layers={spec!r} is malformed: use all, or layer numbers like 2;10;18;26") from None
    if not out:
        raise ConfigError("intervention.layers is empty: use all, or layer numbers like 2;10;18;26")
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"intervention.layers has layer {bad[0]}, but the model has layers 0..{num_layers - 1}")
    return out


class Reft(Method):
    intervention_cls: type

    @classmethod
    def check(cls, config: ReftConfig, model: nn.Module) -> None:
        d = hidden_size(model)
        if not isinstance(config.rank, int) or isinstance(config.rank, bool):
            raise ConfigError(f"intervention.rank={config.rank} is not an integer: use 1..{d} (the hidden size)")
        if not 1 <= config.rank <= d:
            raise ConfigError(f"intervention.rank={config.rank} is out of range: use 1..{d} (the hidden size)")
        if not 0.0 <= float(config.dropout) < 1.0:
            raise ConfigError(f"intervention.dropout={config.dropout} is out of range: use 0 <= p < 1")
        parse_layers(config.layers, len(model_layers(model)))
        Positions.parse(config.positions)

    def __init__(self, config: ReftConfig, model: nn.Module):
        super().__init__(config, model)
        d = hidden_size(model)
        blocks = model_layers(model)
        self.layer_ids = parse_layers(config.layers, len(blocks))
        self.positions = Positions.parse(config.positions)
        self.groups = self.positions.groups(bool(config.share_weights))
        self.interventions = nn.ModuleDict({
            f"layer{i}_{g}": self.intervention_cls(d, config.rank, float(config.dropout))
            for i in self.layer_ids for g in self.groups
        })
        dtype = next(model.parameters()).dtype
        if dtype == torch.float64:  # tests compare against float64 references
            self.interventions.double()
        self._index = None
        self._offset = 0
        self._handles = [blocks[i].register_forward_hook(partial(self._hook, i)) for i in self.layer_ids]
        self._handles.append(backbone(model).register_forward_pre_hook(self._pre_hook, with_kwargs=True))

    def trainable_parameters(self):
        return [p for p in self.interventions.parameters()]

    def added_parameters(self) -> int:
        return sum(p.numel() for p in self.interventions.parameters())

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextmanager
    def context(self, batch):
        index = self.positions.index(batch["prompt_lengths"], batch["prompt_offsets"], bool(self.config.share_weights))
        device = batch["input_ids"].device
        self._index = {g: (i.to(device), v.to(device)) for g, (i, v) in index.items()}
        try:
            yield
        finally:
            self._index = None

    def _pre_hook(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self._offset = cache.get_seq_length() if cache is not None else 0

    def _hook(self, layer_id, module, args, output):
        if self._index is None or self._offset != 0:
            return None  # frozen pass, or a cached decode step after the prompt
        h = output[0] if isinstance(output, tuple) else output
        for group, (idx, valid) in self._index.items():
            if idx.numel() and int(idx.max()) >= h.shape[1]:
                raise RuntimeError("intervention positions lie beyond this forward pass (chunked prefill is not supported)")
            iv = self.interventions[f"layer{layer_id}_{group}"]
            ix = idx.unsqueeze(-1).expand(-1, -1, h.shape[-1])
            selected = h.gather(1, ix)
            delta = iv.delta(selected) * valid.unsqueeze(-1).to(selected.dtype)
            h = h.scatter_add(1, ix, delta.to(h.dtype))
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h


@register("loreft", ReftConfig)
class LoReFTMethod(Reft):
    intervention_cls = INTERVENTIONS["loreft"]


@register("noreft", ReftConfig)
class NoReFTMethod(Reft):
    intervention_cls = INTERVENTIONS["noreft"]


@register("direft", ReftConfig)
class DiReFTMethod(Reft):
    intervention_cls = INTERVENTIONS["direft"]
