"""The one interface every method sits behind (peft-style: a config dataclass plus a module).

The runner only ever calls: build(cfg, model), method.trainable_parameters(),
method.param_groups(lr, weight_decay, head), method.context(batch) around a forward pass,
method.loss_term() after it, method.train()/eval(), method.param_counts(), method.report(),
method.save(dir) and load(dir, model). It never branches on which method it holds.
"""
import dataclasses
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from omegaconf import OmegaConf
from torch import nn

from ..atomic import atomic_path
from ..errors import ConfigError
from ..models import count_params

REGISTRY: dict[str, tuple[type, type]] = {}


def register(name: str, config_cls: type):
    def deco(cls):
        REGISTRY[name] = (config_cls, cls)
        return cls
    return deco


@dataclasses.dataclass
class MethodConfig:
    name: str
    # The method's own recommended learning rate, used when trainer.lr is null (an explicit trainer.lr wins).
    lr: float | None = None
    # Whether trainer.weight_decay applies to the method's parameters (pyreft never decays ReFT's).
    decay: bool = True


class Method(nn.Module):
    """Holds whatever the method adds and knows how to attach it to the base model."""

    def __init__(self, config: MethodConfig, model: nn.Module):
        super().__init__()
        self.config = config
        self.base_params = count_params(model)

    @classmethod
    def check(cls, config: MethodConfig, model: nn.Module) -> None:
        """Reject bad options before any expensive work; raise ConfigError with one line."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def param_groups(self, lr: float, weight_decay: float, head: list) -> list[dict]:
        """The optimiser's parameter groups: the method's trainables and the task's `head` (a classifier;
        empty for language modelling), each with its name, lr and weight decay. By default one lr for
        all, and the method's own tensors decay only when config.decay (pyreft never decays ReFT's)."""
        return [{"name": "method", "params": self.trainable_parameters(), "lr": lr,
                 "weight_decay": weight_decay if self.config.decay else 0.0},
                {"name": "head", "params": list(head), "lr": lr, "weight_decay": weight_decay}]

    def added_parameters(self) -> int:
        """Parameters the method adds to the model (0 for methods that train base weights)."""
        raise NotImplementedError

    @contextmanager
    def context(self, batch: dict):
        """Per-batch state (e.g. which positions to intervene on) around one forward or generate."""
        yield

    def loss_term(self) -> "torch.Tensor | None":
        """A term of the method's own that the training loop adds to the task loss (a regulariser),
        computed after the forward pass it belongs to; None for methods that have none."""
        return None

    def report(self) -> dict:
        """Method-specific facts for result.json (`method_report`), e.g. the sparsity a method reached."""
        return {}

    def param_counts(self) -> dict:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = self.base_params + self.added_parameters()
        return {"trainable": trainable, "base": self.base_params,
                "percent": 100.0 * trainable / total}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()}

    def save(self, path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_path(path / "weights.safetensors") as tmp:
            save_file(self.trainable_state(), str(tmp))
        with atomic_path(path / "method.json") as tmp:
            tmp.write_text(json.dumps(dataclasses.asdict(self.config), indent=2))


def active(method: "Method | None", batch: dict):
    """The method's per-batch context, or nothing for the untouched model (method=None)."""
    return method.context(batch) if method is not None else nullcontext()


def _config_from(cfg) -> MethodConfig:
    data = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    data.pop("search", None)  # reftbench-tune's search space, not an option of the method
    name = data.get("name")
    if name not in REGISTRY:
        raise ConfigError(f"intervention={name!r} is unknown: choose one of {', '.join(sorted(REGISTRY))}")
    config_cls, _ = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"intervention={name} has no option {unknown[0]!r}; it takes {', '.join(sorted(fields - {'name'}))}")
    return config_cls(**data)


def check(cfg, model: nn.Module) -> None:
    """Validate a method's options against a model without changing the model."""
    config = _config_from(cfg)
    REGISTRY[config.name][1].check(config, model)


def build(cfg, model: nn.Module) -> Method:
    """cfg: a mapping with `name` plus the method's own options (the `intervention` group)."""
    config = _config_from(cfg)
    _, cls = REGISTRY[config.name]
    cls.check(config, model)
    return cls(config, model)


def load(path, model: nn.Module, **options) -> Method:
    """A method saved by `Method.save`, or an intervention saved by pyreft's `ReftModel.save`
    (config.json + intkey_*.bin; pyreft does not record the positions: pass `positions=`).
    `options` override saved options. The weights go to the model's device, in their saved dtype."""
    path = Path(path)
    if (path / "method.json").is_file():
        config = {**json.loads((path / "method.json").read_text()), **options}
        state = load_file(str(path / "weights.safetensors"))
        if any(k.endswith(".rotation.A") for k in state):  # saved before the Householder map was the default
            config.setdefault("orthogonal_map", "qr")
        method = build(config, model)
        method.load_state_dict(state)
    else:
        from ..integrations import pyreft
        if not pyreft.is_saved(path):
            raise ConfigError(f"{path} holds no saved method: expected method.json + weights.safetensors "
                              "(reftbench) or config.json + intkey_*.bin (pyreft)")
        method = pyreft.load(path, model, **options)
    return method.to(next(model.parameters()).device)
