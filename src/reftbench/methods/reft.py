"""ReFT methods: an intervention on chosen layers' outputs at chosen prompt positions.

Native PyTorch forward hooks on each block (no pyvene): the hook gathers the selected positions,
applies the intervention to those K vectors only and writes Φ(h) back in their place (as pyvene
does for pyreft), so the cost is O(K·r·d) per layer whatever the sequence length. Φ(h) is computed
in the intervention's dtype (fp32) and rounded once to the model's. Interventions act only on a forward pass that starts at position 0 (training,
prefill, or generation recomputed without a cache); cached decode steps pass through untouched.
The interventions and their pyreft names: see `reftbench.interventions`.
"""
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..errors import ConfigError
from ..interventions import DROPOUT_MODES, HouseholderRows, INTERVENTIONS, ORTHOGONAL, ORTHOGONAL_MAPS
from ..architectures import backbone, blocks as model_layers, hidden_size
from ..positions import Positions
from .base import Method, MethodConfig, register


@dataclass
class ReftConfig(MethodConfig):
    rank: int = 4
    layers: object = "all"  # "all", a list of ints, or "2;10;18;26"
    positions: str = "f7+l7"
    share_weights: bool = True  # the paper's "tied": one intervention per layer for f and l
    dropout: float = 0.0
    dropout_mode: str = "pyreft"  # pyreft: dropout(h + edit) at the intervened positions; edit: dropout of the edit only


@dataclass
class OrthReftConfig(ReftConfig):
    orthogonal_map: str = "householder"  # householder: trains like pyreft (torch's map); qr: our QR map


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
        if config.dropout_mode not in DROPOUT_MODES:
            raise ConfigError(f"intervention.dropout_mode={config.dropout_mode!r} is unknown: use pyreft (dropout of h + edit) or edit")
        if getattr(config, "orthogonal_map", "householder") not in ORTHOGONAL_MAPS:
            raise ConfigError(f"intervention.orthogonal_map={config.orthogonal_map!r} is unknown: use householder (pyreft's) or qr")
        parse_layers(config.layers, len(model_layers(model)))
        Positions.parse(config.positions)

    def __init__(self, config: ReftConfig, model: nn.Module):
        super().__init__(config, model)
        d = hidden_size(model)
        blocks = model_layers(model)
        self.layer_ids = parse_layers(config.layers, len(blocks))
        self.positions = Positions.parse(config.positions)
        self.groups = self.positions.groups(bool(config.share_weights))
        kw = dict(dropout=float(config.dropout), dropout_mode=config.dropout_mode)
        if hasattr(config, "orthogonal_map"):
            kw["orthogonal_map"] = config.orthogonal_map
        on_meta = next(model.parameters()).device.type == "meta"
        with torch.device("meta") if on_meta else nullcontext():  # a dry run: shapes only
            self.interventions = nn.ModuleDict({
                f"layer{i}_{g}": self.intervention_cls(d, config.rank, **kw)
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

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Householder rotations are saved as their effective R, not as B (d×d) and X: loading
        rebuilds B around R with X = −I, which gives the same R bit for bit (not the same
        coordinates for further training)."""
        state = super().trainable_state()
        for name, iv in self.interventions.items():
            if isinstance(getattr(iv, "rotation", None), HouseholderRows):
                prefix = f"interventions.{name}.rotation."
                state.pop(prefix + "base", None)
                del state[prefix + "X"]
                state[prefix + "R"] = iv.R.detach().contiguous()
        return state

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextmanager
    def context(self, batch):
        index = self.positions.index(batch["prompt_lengths"], batch["prompt_offsets"], bool(self.config.share_weights))
        device = batch["input_ids"].device
        self._index = {g: (r.to(device), c.to(device), int(c.max()) if c.numel() else -1)
                       for g, (r, c) in index.items()}
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
        for group, (rows, cols, last) in self._index.items():
            if last >= h.shape[1]:
                raise RuntimeError("intervention positions lie beyond this forward pass (chunked prefill is not supported)")
            if last < 0:
                continue  # no prompt in the batch is long enough for this group
            iv = self.interventions[f"layer{layer_id}_{group}"]
            # each position once per group (the groups are disjoint), so the write is exact
            h = h.index_put((rows, cols), iv(h[rows, cols]).to(h.dtype))
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h


def _register(name: str):
    cls = INTERVENTIONS[name]
    config_cls = OrthReftConfig if name in ORTHOGONAL else ReftConfig
    method = type(f"{cls.__name__}Method", (Reft,), {"intervention_cls": cls, "__doc__": f"ReFT with {cls.__name__}."})
    return register(name, config_cls)(method)


METHODS = {name: _register(name) for name in INTERVENTIONS}
