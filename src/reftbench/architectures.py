"""The one table of the architectures reftbench handles: where each family keeps its layers, attention
projections, FFN and heads, and the modules a method targets by default.

Paths are attribute paths relative to one transformer block (e.g. `self_attn.q_proj`); `layers` is
relative to the backbone (`backbone`). A family absent from the table is not supported. Every module that
needs to know where something lives asks here; none probes attribute names.
"""
from dataclasses import dataclass, field

from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class Arch:
    family: str
    kind: str                      # "decoder" (causal LM) or "encoder" (sequence classifier)
    model_types: tuple[str, ...]
    layers: str                    # the block list, from the backbone
    attention: str                 # the module that owns q, k, v (and o on decoders)
    q: str
    k: str
    v: str
    o: str
    ffn_gate: str | None           # LLaMA's gate_proj; None where the FFN has no gate
    ffn_up: str                    # gate/up on LLaMA, intermediate.dense on BERT
    ffn_down: str                  # down_proj on LLaMA, output.dense on BERT
    rope: bool                     # rotary embeddings pair dims (d, d + head_dim/2) of q and k
    qk_norm: bool = False          # a per-head norm on q and k (Gemma 3): q/k dims cannot be dropped
    lora_targets: tuple[str, ...] = ()
    finegates_targets: tuple[str, ...] = ()
    compressible: tuple[str, ...] = ()  # model types reftbench.compress rebuilds exactly (Gemma: own scaling, q/k norms)
    pad_policy: str | None = None  # reserved: how batches are padded (not used yet)
    extra: dict = field(default_factory=dict)

    def path(self, role: str) -> str:
        """The block-relative path of a role: q, k, v, o, ffn_gate, ffn_up, ffn_down."""
        return getattr(self, role)

    def short(self, role: str) -> str:
        return self.path(role).rsplit(".", 1)[-1]

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(r for r in ("q", "k", "v", "o", "ffn_gate", "ffn_up", "ffn_down") if self.path(r))

    def role_of(self, name: str) -> str | None:
        """The role of a target given by short name (`q_proj`) or block-relative path (`attention.self.query`)."""
        for r in self.roles:
            if name == self.path(r):
                return r
        by_short = [r for r in self.roles if self.short(r) == name]
        return by_short[0] if len(by_short) == 1 else None  # BERT's three `dense` need their path


LLAMA = Arch(
    family="llama", kind="decoder", model_types=("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text"),
    layers="layers", attention="self_attn",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
    ffn_gate="mlp.gate_proj", ffn_up="mlp.up_proj", ffn_down="mlp.down_proj", rope=True,
    lora_targets=("q_proj", "k_proj", "v_proj", "up_proj", "down_proj"),
    finegates_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    compressible=("llama", "mistral", "qwen2"),
)
BERT = Arch(
    family="bert", kind="encoder", model_types=("bert", "roberta"),
    layers="encoder.layer", attention="attention.self",
    q="attention.self.query", k="attention.self.key", v="attention.self.value", o="attention.output.dense",
    ffn_gate=None, ffn_up="intermediate.dense", ffn_down="output.dense", rope=False,
    lora_targets=("query", "value"),
    finegates_targets=("attention.self.query", "attention.self.key", "attention.self.value",
                       "attention.output.dense", "intermediate.dense", "output.dense"),
    compressible=("bert", "roberta"),
)
ARCHITECTURES = (LLAMA, BERT)
QK_NORM = {"gemma3_text"}


def for_model(model: nn.Module) -> Arch:
    mt = model_type(model)
    for arch in ARCHITECTURES:
        if mt in arch.model_types:
            return arch if mt not in QK_NORM else _with(arch, qk_norm=True)
    known = "; ".join(f"{a.kind}s {', '.join(a.model_types)}" for a in ARCHITECTURES)
    raise ConfigError(f"model type {mt!r} is not supported: reftbench handles {known}")


def compressible(model: nn.Module) -> bool:
    """Whether reftbench.compress can rebuild this model's layers exactly."""
    return model_type(model) in compressible_types()


def compressible_types() -> tuple[str, ...]:
    return tuple(t for a in ARCHITECTURES for t in a.compressible)


def kind(model: nn.Module) -> str:
    """decoder or encoder; a clear error for a model the table does not know."""
    return for_model(model).kind


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def backbone(model: nn.Module) -> nn.Module:
    """The transformer stack without the LM or classification head: transformers' own `base_model`
    (the submodule its `base_model_prefix` names; the model itself when it has no head)."""
    return getattr(model, "base_model", model)


def hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def _with(arch: Arch, **kw) -> Arch:
    from dataclasses import replace
    return replace(arch, **kw)


def get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def put(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, last = path.rpartition(".")
    setattr(get(root, parent) if parent else root, last, module)


def blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks, in order."""
    return get(backbone(model), for_model(model).layers)


def heads(model: nn.Module) -> tuple[int, int, int]:
    """(query heads, key/value heads, head_dim) of the model's attention."""
    c = model.config
    n = int(c.num_attention_heads)
    kv = int(getattr(c, "num_key_value_heads", None) or n)
    hd = getattr(c, "head_dim", None) or c.hidden_size // n
    return n, kv, int(hd)
