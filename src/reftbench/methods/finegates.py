"""FineGates (Svirsky, Refael, Lindenbaum; arXiv 2412.12951 / 2602.09169): stochastic gates on the rows and
columns of frozen Linear layers. The spec is ../shared/specs/finegates.md; section numbers below refer to it.

Each targeted Linear computes  y = (W (x ⊙ g_c) + b) ⊙ g_r  (§1.2), with gate logits θ per row and column:
    μ = tanh θ,   train: g = clamp(μ + ε + 0.5, 0, 1), ε ~ N(0, noise_std²), one draw per forward per vector;
                  eval:  g = clamp(μ + 0.5, 0, 1)  (deterministic, possibly fractional)
Regulariser (§2.2): λ · mean over gated layers of ½(|mean_i p_row,i − (1−s)| + |mean_j p_col,j − (1−s)|),
p = Φ((μ + 0.5) / reg_std). `finegates_lora` (§5.6): y = g_r ⊙ ((W + (α/r) B A)(g_c ⊙ x) + b).

The gates act through hooks on the model's own Linear modules, so the model keeps its class, names and
state_dict; W is never touched (a bias trains only with train_bias=gated, and is never created).
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import architectures as archs
from ..errors import ConfigError
from .base import Method, MethodConfig, register
from .peft_methods import parse_targets


@dataclass
class FineGatesConfig(MethodConfig):
    target_modules: object = "auto"
    sparsity_weight: float = 50.0    # λ
    target_sparsity: float = 0.4     # s: the penalty pulls the mean keep-probability to 1 - s
    noise_std: float = 0.1           # σ of the training noise
    reg_std: float = 0.5             # σ inside the regulariser's Φ (the authors' code: 0.5, not noise_std)
    init_mean: float = 1.0           # θ ~ N(init_mean, init_std²): open gates
    init_std: float = 0.1
    train_bias: str = "gated"        # gated: the gated layers' existing biases train (authors' GLUE); none
    head_lr: float | None = None     # the authors' head_learning_rate: biases, LoRA factors, task head; None: lr


@dataclass
class FineGatesLoraConfig(FineGatesConfig):
    rank: int = 4
    alpha: float = 4.0               # scale α/r = 1, as the authors' SparseLoRALayer (no scaling)


class GateVector(nn.Module):
    def __init__(self, n: int, mean: float, std: float, device):
        super().__init__()
        # fp32 even on bf16 models: near θ = 1 bf16 rounds Adam steps below ~0.004 away (§5.16)
        self.logits = nn.Parameter(torch.empty(n, dtype=torch.float32, device=device).normal_(mean, std))

    def gates(self, noise_std: float = 0.0) -> torch.Tensor:
        mu = torch.tanh(self.logits)
        if self.training and noise_std > 0:
            mu = mu + noise_std * torch.randn_like(mu)
        return torch.clamp(mu + 0.5, 0.0, 1.0)

    def keep_prob(self, reg_std: float) -> torch.Tensor:
        """P(gate > 0) under N(0, reg_std²) noise: Φ((μ + 0.5) / reg_std)."""
        mu = torch.tanh(self.logits)
        return 0.5 - 0.5 * torch.erf((-0.5 - mu) / (reg_std * math.sqrt(2.0)))


class GatePair(nn.Module):
    def __init__(self, linear: nn.Linear, cfg: FineGatesConfig):
        super().__init__()
        dev = linear.weight.device
        self.rows = GateVector(linear.out_features, cfg.init_mean, cfg.init_std, dev)
        self.cols = GateVector(linear.in_features, cfg.init_mean, cfg.init_std, dev)


class LoraPair(nn.Module):
    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        dev = linear.weight.device
        self.A = nn.Parameter(torch.empty(rank, linear.in_features, dtype=torch.float32, device=dev))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(linear.out_features, rank, dtype=torch.float32, device=dev))
        self.scale = alpha / rank

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)

    def forward(self, x):
        return self.scale * ((x.float() @ self.A.T) @ self.B.T)


def layer_penalty(pair: GatePair, keep: float, reg_std: float) -> torch.Tensor:
    """½(|mean p_rows − keep| + |mean p_cols − keep|): a two-sided target ratio, not STG's λΣp (§2.2)."""
    return 0.5 * ((pair.rows.keep_prob(reg_std).mean() - keep).abs() + (pair.cols.keep_prob(reg_std).mean() - keep).abs())


def removed_per_layer(g_rows: torch.Tensor, g_cols: torch.Tensor) -> int:
    """The authors' count: out·in − |open rows|·|open cols| (no cascades, no biases)."""
    return g_rows.numel() * g_cols.numel() - int((g_rows > 0).sum()) * int((g_cols > 0).sum())


def key(name: str) -> str:
    return name.replace(".", "-")


def resolve_targets(spec, arch: archs.Arch) -> list[str]:
    """Block-relative paths of the targets (`self_attn.q_proj`, `attention.output.dense`)."""
    names = list(arch.finegates_targets) if spec == "auto" else parse_targets(spec)
    out = []
    for n in names:
        role = arch.role_of(n)
        if role is None:
            options = ", ".join(arch.finegates_targets)
            raise ConfigError(f"intervention.target_modules has {n!r}, which is not a gateable Linear of this "
                              f"{arch.family}-family model: use auto or some of {options}")
        out.append(arch.path(role))
    return list(dict.fromkeys(out))


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@register("finegates", FineGatesConfig)
class FineGatesMethod(Method):
    lora = False
    compressible = True  # reftbench.compress can fold its gates and shrink the model

    @classmethod
    def check(cls, config: FineGatesConfig, model: nn.Module) -> None:
        arch = archs.for_model(model)
        c = config
        if not (_number(c.target_sparsity) and 0.0 <= c.target_sparsity < 1.0):
            raise ConfigError(f"intervention.target_sparsity={c.target_sparsity} is out of range: use 0 <= s < 1")
        for name in ("sparsity_weight", "noise_std", "init_std"):
            v = getattr(c, name)
            if not (_number(v) and v >= 0):
                raise ConfigError(f"intervention.{name}={v} must be a non-negative number")
        if not (_number(c.reg_std) and c.reg_std > 0):
            raise ConfigError(f"intervention.reg_std={c.reg_std} must be a positive number")
        if not _number(c.init_mean):
            raise ConfigError(f"intervention.init_mean={c.init_mean} must be a number")
        if c.head_lr is not None and not (_number(c.head_lr) and c.head_lr >= 0):
            raise ConfigError(f"intervention.head_lr={c.head_lr} must be a non-negative number, or null for lr")
        if c.train_bias not in ("gated", "none"):
            raise ConfigError(f"intervention.train_bias={c.train_bias!r} is unknown: use gated or none")
        if cls.lora:
            if not isinstance(c.rank, int) or isinstance(c.rank, bool) or c.rank < 1:
                raise ConfigError(f"intervention.rank={c.rank} is out of range: use a positive integer")
            if not (_number(c.alpha) and c.alpha > 0):
                raise ConfigError(f"intervention.alpha={c.alpha} must be a positive number")
        targets = resolve_targets(c.target_modules, arch)
        block = archs.blocks(model)[0]
        for t in targets:
            if not isinstance(archs.get(block, t), nn.Linear):
                raise ConfigError(f"intervention.target_modules: {t} is not an nn.Linear in this model")

    def __init__(self, config: FineGatesConfig, model: nn.Module):
        super().__init__(config, model)
        self.arch = archs.for_model(model)
        self.__dict__["model_ref"] = model  # not a submodule: the base model stays out of state_dict
        config.target_modules = resolve_targets(config.target_modules, self.arch)  # saved as the paths used
        self.linears: dict[str, nn.Linear] = {}  # plain dict: the base weights stay out of state_dict
        for i, block in enumerate(archs.blocks(model)):
            for t in config.target_modules:
                self.linears[f"{i}.{t}"] = archs.get(block, t)
        self.gates = nn.ModuleDict({key(n): GatePair(m, config) for n, m in self.linears.items()})
        if self.lora:
            self.adapters = nn.ModuleDict({key(n): LoraPair(m, config.rank, config.alpha)
                                           for n, m in self.linears.items()})
        biases = {key(n): m.bias for n, m in self.linears.items() if m.bias is not None}
        self.biases = nn.ParameterDict(biases if config.train_bias == "gated" else {})
        for p in self.biases.values():
            p.requires_grad_(True)
        self._rows: dict[str, torch.Tensor] = {}
        self._handles = []
        self._merged = None
        self._attach()
        self.train(False)

    # ---- the gated forward -----------------------------------------------------------------
    def _attach(self):
        for n, m in self.linears.items():
            self._handles.append(m.register_forward_pre_hook(self._pre(key(n))))
            self._handles.append(m.register_forward_hook(self._post(key(n))))

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre(self, k):
        def hook(module, args):
            pair, x = self.gates[k], args[0]
            sigma = float(self.config.noise_std)
            self._rows[k] = pair.rows.gates(sigma)  # drawn with the column gates: one draw per forward
            return (x * pair.cols.gates(sigma).to(x.dtype),) + tuple(args[1:])
        return hook

    def _post(self, k):
        def hook(module, args, out):
            if self.lora:  # args[0] is the already column-gated input: both paths share the draw
                out = out + self.adapters[k](args[0]).to(out.dtype)
            return out * self._rows.pop(k).to(out.dtype)
        return hook

    # ---- the interface ---------------------------------------------------------------------
    def trainable_parameters(self):
        return list(self.gates.parameters()) + list(self.biases.values()) + (
            list(self.adapters.parameters()) if self.lora else [])

    def param_groups(self, lr: float, weight_decay: float, head: list) -> list[dict]:
        """The authors' two AdamW groups (spec §2.4): the gates at lr with no weight decay; everything
        else (biases, LoRA factors, the task's head) at head_lr with trainer.weight_decay."""
        rest_lr = lr if self.config.head_lr is None else float(self.config.head_lr)
        gates = list(self.gates.parameters())
        gate_ids = {id(g) for g in gates}
        rest = [p for p in self.trainable_parameters() if id(p) not in gate_ids] + list(head)
        return [{"name": "gates", "params": gates, "lr": lr, "weight_decay": 0.0},
                {"name": "head", "params": rest, "lr": rest_lr, "weight_decay": weight_decay}]

    def added_parameters(self) -> int:
        return self.gate_count() + (sum(p.numel() for p in self.adapters.parameters()) if self.lora else 0)

    def gate_count(self) -> int:
        return sum(p.numel() for p in self.gates.parameters())

    def param_counts(self) -> dict:
        counts = super().param_counts()
        parts = {"gates": self.gate_count(), "biases": sum(p.numel() for p in self.biases.values())}
        if self.lora:
            parts["lora"] = sum(p.numel() for p in self.adapters.parameters())
        counts["parts"] = {k: v for k, v in parts.items() if v}
        counts["added"] = self.added_parameters()
        return counts

    def regulariser(self) -> torch.Tensor:
        """Mean over gated layers of the layer penalty (plain mean, not weighted by layer size)."""
        keep, sigma = 1.0 - float(self.config.target_sparsity), float(self.config.reg_std)
        return torch.stack([layer_penalty(p, keep, sigma) for p in self.gates.values()]).mean()

    def loss_term(self):
        if not self.config.sparsity_weight:
            return None
        return float(self.config.sparsity_weight) * self.regulariser()

    @torch.no_grad()
    def eval_gates(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Target name -> (row gates, column gates), deterministic (noise-free) whatever the mode."""
        out = {}
        for n in self.linears:
            pair = self.gates[key(n)]
            out[n] = (pair.rows.gates(0.0).detach().clone(), pair.cols.gates(0.0).detach().clone())
        return out

    @torch.no_grad()
    def effective(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's ungated weight and bias (W + (α/r)BA for finegates_lora), in fp32."""
        m = self.linears[name]
        w = m.weight.float()
        if self.lora:
            w = w + self.adapters[key(name)].delta()
        return w, (m.bias.float() if m.bias is not None else None)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the eval gates (and LoRA) into W and b in place, zeros kept; the hooks go. unmerge() undoes it."""
        if self._merged is not None:
            return
        self._merged = {}
        for n, (gr, gc) in self.eval_gates().items():
            m = self.linears[n]
            w, b = self.effective(n)
            self._merged[n] = (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
            m.weight.copy_((gr[:, None] * w * gc[None, :]).to(m.weight.dtype))
            if b is not None:
                m.bias.copy_((gr * b).to(m.bias.dtype))
        self.remove()

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._merged is None:
            return
        for n, (w, b) in self._merged.items():
            self.linears[n].weight.copy_(w)
            if b is not None:
                self.linears[n].bias.copy_(b)
        self._merged = None
        self._attach()

    @torch.no_grad()
    def report(self) -> dict:
        gates = self.eval_gates()
        rows = sum(int((gr == 0).sum()) for gr, _ in gates.values())
        cols = sum(int((gc == 0).sum()) for _, gc in gates.values())
        n_rows = sum(gr.numel() for gr, _ in gates.values())
        n_cols = sum(gc.numel() for _, gc in gates.values())
        fractional = sum(int(((g > 0) & (g < 1)).sum()) for pair in gates.values() for g in pair)
        gated = sum(gr.numel() * gc.numel() for gr, gc in gates.values())
        removed = sum(removed_per_layer(gr, gc) for gr, gc in gates.values())
        reg = float(self.regulariser())
        out = {
            "regulariser": reg, "regulariser_weighted": float(self.config.sparsity_weight) * reg,
            "closed_rows": rows, "rows": n_rows, "closed_cols": cols, "cols": n_cols,
            "closed_gate_share": (rows + cols) / (n_rows + n_cols),
            "fractional_gates": fractional,
            "gated_weights": gated, "removed_per_layer": removed,
            "sparsity_gated": removed / gated, "sparsity_model": removed / self.base_params,
        }
        try:  # the cascade-aware count follows the compressor's fusion rules (§3.2)
            from ..compress.plan import plan_counts
            out.update(plan_counts(self))
        except ConfigError:
            pass
        return out


@register("finegates_lora", FineGatesLoraConfig)
class FineGatesLoraMethod(FineGatesMethod):
    lora = True
