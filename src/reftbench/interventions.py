"""The ReFT interventions on a hidden state h (the residual stream after a layer), as in pyreft.

Every one has the form Φ(h) = h + low(h) @ U with a low-rank vector low(h) ∈ ℝ^r and U ∈ ℝ^{r×d}:

  ours         pyreft class            Φ(h)
  loreft       LoreftIntervention      h + Rᵀ(Wh + b − Rh)   R orthonormal rows (paper Eq. 2)
  noreft       NoreftIntervention      h + W2ᵀ(W1h + b − W2h)  (LoReFT with R free)
  direft       NodireftIntervention    h + W2ᵀ(W1h + b)      no orthogonality (paper Eq. 3)
  orthdireft   DireftIntervention      h + Rᵀ(Wh + b)        R orthonormal rows
  consreft     ConsreftIntervention    h + Rᵀ(b − Rh)
  lobireft     LobireftIntervention    h + Rᵀb

Note the DiReFT names: pyreft's `DireftIntervention` keeps R orthonormal; the paper's DiReFT
(Eq. 3, our `direft`) is pyreft's `NodireftIntervention`.

R comes from `make_rotation`: the default `householder` map trains like pyreft's
(torch's `parametrizations.orthogonal`); `qr` is our earlier QR map. Initialisation follows
pyreft: W, W1, W2 have nn.Linear's default init, R orthonormal, ConsReFT/LobiReFT's b ~ U[0, 1).

Dropout (`dropout_mode`): `pyreft` drops the whole intervened output, dropout(h + edit), at the
intervened positions, as pyreft does; `edit` drops the low-rank vector only, leaving h intact.
"""
import torch
from torch import nn

from .errors import ConfigError

ORTHOGONAL_MAPS = ("householder", "qr")
DROPOUT_MODES = ("pyreft", "edit")


def _make_orthogonal(a: torch.Tensor) -> torch.Tensor:
    """Q of a = QΓ with diag Γ ≥ 0 (torch's own completion step for its orthogonal map)."""
    x, tau = torch.geqrf(a)
    return torch.linalg.householder_product(x, tau) * x.diagonal().sgn().unsqueeze(-2)


def _orthogonal_init(dim: int, rank: int) -> torch.Tensor:
    w = torch.empty(dim, rank)
    nn.init.orthogonal_(w)
    return w


def _complete(rt: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """An orthogonal d×d matrix whose first r columns are exactly rt (d×r, orthonormal columns);
    the other columns span the rest of the space, oriented by `noise` (d×(d−r))."""
    base = _make_orthogonal(torch.cat([rt, noise.to(rt)], dim=1))
    base[:, : rt.shape[1]] = rt
    return base


def householder_map(base: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Rᵀ = B · H(X), [d, r]: torch's householder map with trivialisation base B, with the signs
    of X's diagonal read robustly (a negative entry is −1, anything else +1; torch's `.int()`
    turns −0.99999 into 0)."""
    a = X.tril(-1)
    tau = 2.0 / (1.0 + (a * a).sum(dim=-2))
    q = _householder_product(a, tau)
    sign = torch.where(X.detach().diagonal() < 0, -1.0, 1.0).to(q.dtype)
    return base @ (q * sign.unsqueeze(-2))


def _householder_product(a: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """torch.linalg.householder_product(a, tau) for a strictly lower-triangular a (d×r):
    Q = H_0 ⋯ H_{r−1} I[:, :r], H_i = I − tau_i v_i v_iᵀ, v_i = e_i + a[:, i]. The same product
    in r rank-one updates, O(d r²); torch's own backward for it takes ~0.5 s on a CPU at d = 576."""
    d, r = a.shape
    eye = torch.eye(d, r, dtype=a.dtype, device=a.device)
    v = a + eye
    q = eye
    for i in reversed(range(r)):
        vi = v[:, i:i + 1]
        q = q - (tau[i] * vi) @ (vi.T @ q)
    return q


def householder_state(R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, X) whose map gives exactly R ([r, d], orthonormal rows): B a completion of Rᵀ (first
    columns Rᵀ bit for bit, the rest a fixed function of R), X = −I."""
    rank, dim = R.shape
    noise = torch.randn(dim, dim - rank, generator=torch.Generator().manual_seed(0))
    x = torch.zeros(dim, rank, dtype=R.dtype, device=R.device)
    x.diagonal().fill_(-1.0)
    return _complete(R.T.contiguous(), noise), x


class HouseholderRows(nn.Module):
    """R = (B · H(X))ᵀ: torch's `orthogonal(…, orthogonal_map="householder")` on a [d, r] weight,
    the map pyreft's R trains with.

    B (d×d, orthogonal, never trained) is the trivialisation base: an orthogonal completion of
    the initial Rᵀ. X (d×r, the trained parameter) starts at −I; H(X) is the product of the
    Householder reflections stored below X's diagonal, times the signs of X's diagonal. The same
    gradient gives the same step as in pyreft under any optimiser (to rounding: the product is
    formed by `_householder_product`, an ulp away from LAPACK's). Only the signs are read
    differently (see `householder_map`), so R stays orthonormal under weight decay, where torch's
    map makes R exactly zero after one decayed step.

    B is a non-persistent buffer: a constant the run rebuilds from its seed, so it stays out of
    state_dict (checkpoints, model selection's copies) and DDP never syncs it. state_dict holds X;
    a state with B beside X (pyreft's, torch's) loads both, one with R instead of them rebuilds B.
    """

    def __init__(self, rank: int, dim: int):
        super().__init__()
        self.rank, self.dim = rank, dim
        x = torch.zeros(dim, rank)
        x.diagonal().fill_(-1.0)
        self.X = nn.Parameter(x)
        if torch.empty(0).device.type == "meta":  # a dry run only counts parameters
            base = torch.empty(dim, dim)
        else:  # torch's own initialisation: a random orthogonal weight, completed at random
            base = _complete(_orthogonal_init(dim, rank), torch.randn(dim, dim - rank))
        self.register_buffer("base", base, persistent=False)

    def forward(self) -> torch.Tensor:
        """Rᵀ, [d, r] (pyreft's `rotate_layer.weight`)."""
        return householder_map(self.base, self.X)

    @torch.no_grad()
    def set_state(self, base: torch.Tensor, X: torch.Tensor) -> None:
        """Load the trivialisation base B and the parameter X (torch's or pyreft's state)."""
        self.base.copy_(base)
        self.X.copy_(X)

    def load_R(self, R: torch.Tensor) -> None:
        self.set_state(*householder_state(R.to(self.base.dtype)))  # computed where R is

    def _load_from_state_dict(self, state_dict, prefix, *args):
        if prefix + "R" in state_dict and prefix + "X" not in state_dict:
            return self.load_R(state_dict[prefix + "R"])
        if prefix + "base" in state_dict:  # an explicit B (pyreft's state, an older checkpoint)
            with torch.no_grad():
                self.base.copy_(state_dict[prefix + "base"])
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "base"}
        super()._load_from_state_dict(state_dict, prefix, *args)


class QRRows(nn.Module):
    """R = Qᵀ where A = QΓ is the reduced QR decomposition of an unconstrained A ∈ ℝ^{d×r}.

    Any update to A leaves R orthonormal (weight decay included). Unlike the Householder map it
    passes a step through with gain 1, so R moves 2-4x less per step than in pyreft.
    """

    def __init__(self, rank: int, dim: int):
        super().__init__()
        self.rank, self.dim = rank, dim
        self.A = nn.Parameter(_orthogonal_init(dim, rank))

    def forward(self) -> torch.Tensor:
        """Rᵀ, [d, r]."""
        q, g = torch.linalg.qr(self.A, mode="reduced")
        sign = torch.sign(torch.diagonal(g))
        return q * torch.where(sign == 0, torch.ones_like(sign), sign)

    @torch.no_grad()
    def load_R(self, R: torch.Tensor) -> None:
        self.A.copy_(R.T)  # QR of an orthonormal matrix returns it up to rounding (~1e-7)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        if prefix + "R" in state_dict and prefix + "A" not in state_dict:
            return self.load_R(state_dict[prefix + "R"])
        super()._load_from_state_dict(state_dict, prefix, *args)


def make_rotation(rank: int, dim: int, orthogonal_map: str = "householder") -> nn.Module:
    if orthogonal_map == "householder":
        return HouseholderRows(rank, dim)
    if orthogonal_map == "qr":
        return QRRows(rank, dim)
    raise ConfigError(f"intervention.orthogonal_map={orthogonal_map!r} is unknown: use householder (pyreft's) or qr")


class Intervention(nn.Module):
    """Φ(h) = h + low(h) @ U. Subclasses define `parts(h) -> (low(h), U)`."""

    def __init__(self, embed_dim: int, rank: int, dropout: float = 0.0, dropout_mode: str = "pyreft"):
        super().__init__()
        if dropout_mode not in DROPOUT_MODES:
            raise ConfigError(f"intervention.dropout_mode={dropout_mode!r} is unknown: use pyreft (dropout of h + edit) or edit")
        self.embed_dim, self.rank, self.dropout_mode = embed_dim, rank, dropout_mode
        self.dropout = nn.Dropout(dropout)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """The edit low(h) @ U (with the `edit` mode's dropout); h in the intervention's dtype."""
        low, up = self.parts(h)
        if self.dropout_mode == "edit":
            low = self.dropout(low)
        return low @ up

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The intervened hidden states, in the intervention's dtype (fp32 beside a bf16 model);
        the caller rounds once to the model's dtype, as pyreft does."""
        h = h.to(self.dtype)
        out = h + self.delta(h)
        return self.dropout(out) if self.dropout_mode == "pyreft" else out


class _Rotated(Intervention):
    """Interventions with an orthonormal R (pyreft's `rotate_layer`). Rᵀ is computed once per
    call and used for both Rh and Rᵀ(…), in the same memory layout as pyreft's weight."""

    def __init__(self, embed_dim, rank, dropout=0.0, dropout_mode="pyreft", orthogonal_map="householder"):
        super().__init__(embed_dim, rank, dropout, dropout_mode)
        self.rotation = make_rotation(rank, embed_dim, orthogonal_map)

    @property
    def R(self) -> torch.Tensor:
        return self.rotation().T


class LoReFT(_Rotated):
    def __init__(self, embed_dim, rank, dropout=0.0, dropout_mode="pyreft", orthogonal_map="householder"):
        super().__init__(embed_dim, rank, dropout, dropout_mode, orthogonal_map)
        self.W = nn.Linear(embed_dim, rank)

    def parts(self, h):
        rt = self.rotation()
        return self.W(h) - h @ rt, rt.T


class OrthDiReFT(_Rotated):
    def __init__(self, embed_dim, rank, dropout=0.0, dropout_mode="pyreft", orthogonal_map="householder"):
        super().__init__(embed_dim, rank, dropout, dropout_mode, orthogonal_map)
        self.W = nn.Linear(embed_dim, rank)

    def parts(self, h):
        return self.W(h), self.rotation().T


class ConsReFT(_Rotated):
    def __init__(self, embed_dim, rank, dropout=0.0, dropout_mode="pyreft", orthogonal_map="householder"):
        super().__init__(embed_dim, rank, dropout, dropout_mode, orthogonal_map)
        self.b = nn.Parameter(torch.rand(rank))

    def parts(self, h):
        rt = self.rotation()
        return self.b - h @ rt, rt.T


class LobiReFT(_Rotated):
    def __init__(self, embed_dim, rank, dropout=0.0, dropout_mode="pyreft", orthogonal_map="householder"):
        super().__init__(embed_dim, rank, dropout, dropout_mode, orthogonal_map)
        self.b = nn.Parameter(torch.rand(rank))

    def parts(self, h):
        return self.b.expand(*h.shape[:-1], self.rank), self.rotation().T


class NoReFT(Intervention):
    """LoReFT with R free: R is a bias-free nn.Linear (pyreft's `proj_layer`, default init)."""

    def __init__(self, embed_dim, rank, dropout=0.0, dropout_mode="pyreft"):
        super().__init__(embed_dim, rank, dropout, dropout_mode)
        self.W = nn.Linear(embed_dim, rank)
        self.W2 = nn.Linear(embed_dim, rank, bias=False)

    @property
    def R(self) -> torch.Tensor:
        return self.W2.weight

    def parts(self, h):
        return self.W(h) - self.W2(h), self.W2.weight


class DiReFT(Intervention):
    """The paper's DiReFT (pyreft's `NodireftIntervention`): W1, W2 both default nn.Linear init."""

    def __init__(self, embed_dim, rank, dropout=0.0, dropout_mode="pyreft"):
        super().__init__(embed_dim, rank, dropout, dropout_mode)
        self.W1 = nn.Linear(embed_dim, rank)
        self.W2 = nn.Linear(embed_dim, rank, bias=False)

    def parts(self, h):
        return self.W1(h), self.W2.weight


INTERVENTIONS = {"loreft": LoReFT, "noreft": NoReFT, "direft": DiReFT, "orthdireft": OrthDiReFT,
                 "consreft": ConsReFT, "lobireft": LobiReFT}
ORTHOGONAL = {name for name, cls in INTERVENTIONS.items() if issubclass(cls, _Rotated)}
