"""FineGates (Svirsky, Refael, Lindenbaum; arXiv 2412.12951 / 2602.09169): stochastic gates on the rows and
columns of frozen Linear layers. The spec is ../shared/specs/finegates.md; section numbers below refer to it.

Each targeted Linear computes  y = (W (x ⊙ g_c) + b) ⊙ g_r  (§1.2), with gate logits θ per row and column:
    μ = tanh θ,   train: g = clamp(μ + ε + 0.5, 0, 1), ε ~ N(0, noise_std²), one draw per forward per vector;
                  eval:  g = clamp(μ + 0.5, 0, 1)  (deterministic, possibly fractional)
`finegates_lora` (§5.6): y = g_r ⊙ ((W + (α/r) B A)(g_c ⊙ x) + b).

The gate logits are flat: one (layers, width) tensor per targeted Linear and side, so the gates of a
forward and the regulariser are a few vectorised ops for the whole model. Two regularisers (`reg`), with
p = Φ((μ + 0.5)/reg_std) the smooth keep-probability of a gate:
- `rank` (default): each layer closes the share f = 1 − √(1 − s_t) of its rows and of its columns, so that
  1 − (1 − f)² = s_t of its weights go. Per layer and side, the ⌊f·n⌉ gates with the lowest logits are
  pulled closed (λ · mean p over them); a closed gate outside that set is pulled back open (λ · mean (1 − p)).
  The task gradient decides the ranking; the rest of the gates are left to the task.
- `target` (the authors' code, §2.2): λ · mean over layers of ½(|mean p_rows − (1−s)| + |mean p_cols − (1−s)|).
  Under Adam every gate of a layer gets the same step from it, so the gates drift down together and stop,
  fractional, where the mean p meets 1 − s: on short runs no gate closes (README, "FineGates").
s_t ramps from 0 to s over the first `sparsity_warmup` training forwards (cubic, as gradual pruning).

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

CLOSED = -math.atanh(0.5)  # θ at or below this closes a gate at eval (μ ≤ −0.5)


@dataclass
class FineGatesConfig(MethodConfig):
    target_modules: object = "auto"
    sparsity_weight: float = 50.0    # λ
    target_sparsity: float = 0.4     # s
    reg: str = "rank"                # rank: s of the gated weights is reached; target: the authors' form
    sparsity_warmup: int = 0         # training forwards over which the target ramps from 0 to s (0: at once)
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


def gate_values(logits: torch.Tensor, noise_std: float = 0.0) -> torch.Tensor:
    mu = torch.tanh(logits)
    if noise_std > 0:  # one draw per gate (the tensor holds each vector once)
        mu = mu + noise_std * torch.randn_like(mu)
    return torch.clamp(mu + 0.5, 0.0, 1.0)


def keep_prob(logits: torch.Tensor, reg_std: float) -> torch.Tensor:
    """P(gate > 0) under N(0, reg_std²) noise: Φ((μ + 0.5) / reg_std)."""
    return 0.5 - 0.5 * torch.erf((-0.5 - torch.tanh(logits)) / (reg_std * math.sqrt(2.0)))


def layer_penalty(rows: torch.Tensor, cols: torch.Tensor, keep: float, reg_std: float) -> torch.Tensor:
    """The authors' per-layer term ½(|mean p_rows − keep| + |mean p_cols − keep|) for logits of shape
    (..., width): one value per leading index (§2.2)."""
    return 0.5 * ((keep_prob(rows, reg_std).mean(-1) - keep).abs() + (keep_prob(cols, reg_std).mean(-1) - keep).abs())


def rank_penalty(logits: torch.Tensor, closed_share: float, reg_std: float) -> torch.Tensor:
    """Per leading index of (..., n) logits: mean p over the ⌊closed_share·n⌉ lowest gates (pulled closed),
    plus mean (1 − p) over the closed gates outside them (pulled back open)."""
    n = logits.shape[-1]
    k = int(round(closed_share * n))
    p = keep_prob(logits, reg_std)
    theta = logits.detach()
    chosen = torch.zeros_like(theta, dtype=torch.bool)
    if k:
        chosen.scatter_(-1, theta.argsort(dim=-1)[..., :k], True)
    stray = ~chosen & (theta <= CLOSED)
    return (p * chosen).sum(-1) / max(k, 1) + ((1 - p) * stray).sum(-1) / max(n - k, 1)


def removed_per_layer(g_rows: torch.Tensor, g_cols: torch.Tensor) -> int:
    """The authors' count: out·in − |open rows|·|open cols| (no cascades, no biases)."""
    return g_rows.numel() * g_cols.numel() - int((g_rows > 0).sum()) * int((g_cols > 0).sum())


def key(name: str) -> str:
    return name.replace(".", "-")


class GateView:
    """`rows.logits` / `cols.logits` of one Linear: views into the flat tensors (writable under no_grad)."""

    class _Side:
        def __init__(self, logits):
            self.logits = logits

    def __init__(self, rows, cols):
        self.rows, self.cols = self._Side(rows), self._Side(cols)


class FlatGates(nn.Module):
    """All gate logits: for each targeted path t, rows[t] of shape (layers, out) and cols[t] of (layers, in)."""

    def __init__(self, shapes: dict[str, tuple[int, int]], layers: int, mean: float, std: float, device):
        super().__init__()
        # fp32 even on bf16 models: near θ = 1 bf16 rounds Adam steps below ~0.004 away (§5.16)
        def make(n):
            return nn.Parameter(torch.empty(layers, n, dtype=torch.float32, device=device).normal_(mean, std))
        self.rows = nn.ParameterDict({key(t): make(o) for t, (o, _) in shapes.items()})
        self.cols = nn.ParameterDict({key(t): make(i) for t, (_, i) in shapes.items()})

    def __getitem__(self, name: str) -> GateView:
        """`"3-mlp-up_proj"` (layer-path with dashes) -> that Linear's gates."""
        layer, _, t = name.partition("-")
        return GateView(self.rows[t][int(layer)], self.cols[t][int(layer)])


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


def linear_weights(model: nn.Module) -> int:
    """Weight elements of the model's Linears that are not an embedding (a tied LM head is the embedding
    table): the weights that cost compute, the honest denominator of a removed share."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) not in emb)


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
        if c.reg not in ("rank", "target"):
            raise ConfigError(f"intervention.reg={c.reg!r} is unknown: use rank (s of the gated weights is "
                              "reached) or target (the authors' mean keep-probability)")
        if not (isinstance(c.sparsity_warmup, int) and not isinstance(c.sparsity_warmup, bool)
                and c.sparsity_warmup >= 0):
            raise ConfigError(f"intervention.sparsity_warmup={c.sparsity_warmup} must be a non-negative integer")
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
        self.linear_weights = linear_weights(model)
        config.target_modules = resolve_targets(config.target_modules, self.arch)  # saved as the paths used
        blocks = archs.blocks(model)
        self.targets = list(config.target_modules)
        self.linears: dict[str, nn.Linear] = {}  # plain dict: the base weights stay out of state_dict
        for i, block in enumerate(blocks):
            for t in self.targets:
                self.linears[f"{i}.{t}"] = archs.get(block, t)
        first = {t: archs.get(blocks[0], t) for t in self.targets}
        for n, m in self.linears.items():
            t = n.split(".", 1)[1]
            if m.weight.shape != first[t].weight.shape:
                raise ConfigError(f"FineGates needs {t} to have one shape in every layer ({n} differs)")
        self.gates = FlatGates({t: (m.out_features, m.in_features) for t, m in first.items()}, len(blocks),
                               config.init_mean, config.init_std, first[self.targets[0]].weight.device)
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))  # training forwards (the schedule)
        if self.lora:
            self.adapters = nn.ModuleDict({key(n): LoraPair(m, config.rank, config.alpha)
                                           for n, m in self.linears.items()})
        biases = {key(n): m.bias for n, m in self.linears.items() if m.bias is not None}
        self.biases = nn.ParameterDict(biases if config.train_bias == "gated" else {})
        for p in self.biases.values():
            p.requires_grad_(True)
        self._drawn = None
        self._handles = []
        self._merged = None
        self._attach()
        self.train(False)

    # ---- the gated forward -----------------------------------------------------------------
    def _attach(self):
        # the backbone runs once per forward of any head: a new forward draws new gates (lazily, below)
        self._handles.append(archs.backbone(self.model_ref).register_forward_pre_hook(self._reset))
        for n, m in self.linears.items():
            layer, t = n.split(".", 1)
            self._handles.append(m.register_forward_pre_hook(self._pre(int(layer), key(t))))
            self._handles.append(m.register_forward_hook(self._post(int(layer), key(t), key(n))))

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def _reset(self, module, args):
        self._drawn = None

    def draw(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """This forward's gates of every Linear: path key -> (rows (layers, out), cols (layers, in))."""
        if self._drawn is None:
            sigma = float(self.config.noise_std) if self.training else 0.0
            self._drawn = {t: (gate_values(self.gates.rows[t], sigma), gate_values(self.gates.cols[t], sigma))
                           for t in self.gates.rows}
        return self._drawn

    def _pre(self, layer, t):
        def hook(module, args):
            x = args[0]
            return (x * self.draw()[t][1][layer].to(x.dtype),) + tuple(args[1:])
        return hook

    def _post(self, layer, t, k):
        def hook(module, args, out):
            if self.lora:  # args[0] is the already column-gated input: both paths share the draw
                out = out + self.adapters[k](args[0]).to(out.dtype)
            return out * self.draw()[t][0][layer].to(out.dtype)
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

    def target_now(self) -> float:
        """s at this point of training: a cubic ramp from 0 over `sparsity_warmup` training forwards."""
        s, n = float(self.config.target_sparsity), int(self.config.sparsity_warmup)
        if n <= 0:
            return s
        return s * (1.0 - (1.0 - min(int(self.forwards), n) / n) ** 3)

    def regulariser(self) -> torch.Tensor:
        """Mean over gated layers (plain mean, not weighted by layer size) of the layer's penalty."""
        s, sigma = self.target_now(), float(self.config.reg_std)
        if self.config.reg == "target":
            return torch.cat([layer_penalty(r, self.gates.cols[t], 1.0 - s, sigma)
                              for t, r in self.gates.rows.items()]).mean()
        f = 1.0 - math.sqrt(1.0 - s)  # per side: (1 - f)² of the weights stay
        return torch.cat([0.5 * (rank_penalty(r, f, sigma) + rank_penalty(self.gates.cols[t], f, sigma))
                          for t, r in self.gates.rows.items()]).mean()

    def loss_term(self):
        if self.training:
            self.forwards += 1
        if not self.config.sparsity_weight:
            return None
        return float(self.config.sparsity_weight) * self.regulariser()

    @torch.no_grad()
    def eval_gates(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Target name -> (row gates, column gates), deterministic (noise-free) whatever the mode."""
        rows = {t: gate_values(p) for t, p in self.gates.rows.items()}
        cols = {t: gate_values(p) for t, p in self.gates.cols.items()}
        out = {}
        for n in self.linears:
            layer, t = n.split(".", 1)
            out[n] = (rows[key(t)][int(layer)].clone(), cols[key(t)][int(layer)].clone())
        return out

    @torch.no_grad()
    def effective(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's ungated weight and bias (W + (α/r)BA for finegates_lora), in fp32."""
        m = self.linears[name]
        w = m.weight.float()
        if self.lora:
            w = w + self.adapters[key(name)].delta()
        return w, (m.bias.float() if m.bias is not None else None)

    @property
    def merged(self) -> bool:
        return self._merged is not None

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> None:
        """Fold the eval gates (and LoRA) into W and b in place, zeros kept; the hooks go. unmerge() undoes it
        (keep_original=False keeps no copy: the compressor then shrinks the folded weights as they are)."""
        if self._merged is not None:
            return
        self._merged = {}
        for n, (gr, gc) in self.eval_gates().items():
            m = self.linears[n]
            w, b = self.effective(n)
            if keep_original:
                self._merged[n] = (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
            m.weight.copy_((gr[:, None] * w * gc[None, :]).to(m.weight.dtype))
            if b is not None:
                m.bias.copy_((gr * b).to(m.bias.dtype))
        self.remove()

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._merged is None:
            return
        if len(self._merged) < len(self.linears):
            raise RuntimeError("merge(keep_original=False) kept no copy of the weights: nothing to unmerge")
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
        by_type = {}
        for t in self.targets:
            pairs = [gates[n] for n in gates if n.split(".", 1)[1] == t]
            size = sum(gr.numel() * gc.numel() for gr, gc in pairs)
            by_type[t] = sum(removed_per_layer(*p) for p in pairs) / size
        reg = float(self.regulariser())
        out = {
            "regulariser": reg, "regulariser_weighted": float(self.config.sparsity_weight) * reg,
            "reg": self.config.reg,
            "closed_rows": rows, "rows": n_rows, "closed_cols": cols, "cols": n_cols,
            "closed_gate_share": (rows + cols) / (n_rows + n_cols),
            "fractional_gates": fractional,
            "gated_weights": gated, "linear_weights": self.linear_weights, "model_params": self.base_params,
            "removed_per_layer": removed,
            "sparsity_gated": removed / gated, "sparsity_linear": removed / self.linear_weights,
            "sparsity_model": removed / self.base_params,
            "sparsity_by_type": by_type,
        }
        try:  # what the compressor removes physically (§3.2, with its fusion and layout rules)
            from ..compress.plan import plan_counts
            out.update(plan_counts(self))
        except ConfigError:
            pass
        return out


@register("finegates_lora", FineGatesLoraConfig)
class FineGatesLoraMethod(FineGatesMethod):
    lora = True
