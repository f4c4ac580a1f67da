"""The paper's interventions on a hidden state h (the residual stream after a layer).

LoReFT  Φ(h) = h + Rᵀ(Wh + b − Rh), R ∈ ℝ^{r×d} with orthonormal rows   (paper Eq. 2)
NoReFT  the same with R unconstrained
DiReFT  Φ(h) = h + W2ᵀ(W1h + b), no orthogonality, no difference term   (paper Eq. 3)

Each module computes `delta(h)`, so `forward(h) = h + delta(h)`; the method scatters only the
delta back into the selected positions. Dropout acts on the low-rank edit, never on h itself.
"""
import torch
from torch import nn


def _orthonormal_rows(rank: int, dim: int) -> torch.Tensor:
    w = torch.empty(rank, dim)
    nn.init.orthogonal_(w)
    return w


class OrthonormalRows(nn.Module):
    """R = Qᵀ where A = QΓ is the reduced QR decomposition of an unconstrained A ∈ ℝ^{d×r}.

    Any update to A (AdamW with weight decay included) leaves R orthonormal, because R is
    recomputed from A. The signs are fixed (diag Γ > 0) so R depends smoothly on A. QR of a
    d×r matrix costs O(d r²), far cheaper than the d×d matrix exponential or Cayley maps, and
    unlike torch's Householder parametrization it stays orthonormal under weight decay.
    """

    def __init__(self, rank: int, dim: int):
        super().__init__()
        self.A = nn.Parameter(_orthonormal_rows(rank, dim).T.contiguous())

    def forward(self) -> torch.Tensor:
        q, g = torch.linalg.qr(self.A, mode="reduced")
        sign = torch.sign(torch.diagonal(g))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return (q * sign).T


class LoReFT(nn.Module):
    def __init__(self, embed_dim: int, rank: int, dropout: float = 0.0, orthogonal: bool = True):
        super().__init__()
        self.embed_dim, self.rank = embed_dim, rank
        self.W = nn.Linear(embed_dim, rank)
        if orthogonal:
            self.rotation = OrthonormalRows(rank, embed_dim)
        else:
            self.R_free = nn.Parameter(_orthonormal_rows(rank, embed_dim))
        self.dropout = nn.Dropout(dropout)

    @property
    def R(self) -> torch.Tensor:
        return self.rotation() if hasattr(self, "rotation") else self.R_free

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        h = h.to(self.W.weight.dtype)  # low-precision models keep fp32 interventions
        R = self.R
        return self.dropout(self.W(h) - h @ R.T) @ R

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h)


class NoReFT(LoReFT):
    def __init__(self, embed_dim: int, rank: int, dropout: float = 0.0):
        super().__init__(embed_dim, rank, dropout, orthogonal=False)


class DiReFT(nn.Module):
    def __init__(self, embed_dim: int, rank: int, dropout: float = 0.0):
        super().__init__()
        self.embed_dim, self.rank = embed_dim, rank
        self.W1 = nn.Linear(embed_dim, rank)
        self.W2_weight = nn.Parameter(_orthonormal_rows(rank, embed_dim))
        self.dropout = nn.Dropout(dropout)

    @property
    def W2(self) -> torch.Tensor:
        return self.W2_weight

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        h = h.to(self.W1.weight.dtype)
        return self.dropout(self.W1(h)) @ self.W2

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h)


INTERVENTIONS = {"loreft": LoReFT, "noreft": NoReFT, "direft": DiReFT}
