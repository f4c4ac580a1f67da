"""The ReFT family's formulas, orthogonal maps, initialisation and dropout, checked directly."""
import pytest
import torch
from torch import nn

from reftbench.errors import ConfigError
from reftbench.interventions import (INTERVENTIONS, ConsReFT, DiReFT, HouseholderRows, LobiReFT, LoReFT, NoReFT,
                                     OrthDiReFT, QRRows)


def _per_vector(h, f):
    return torch.stack([torch.stack([f(x) for x in row]) for row in h])


def test_loreft_formula_matches_direct_computation():
    torch.manual_seed(0)
    iv = LoReFT(16, 3).double()
    h = torch.randn(2, 5, 16, dtype=torch.float64)
    R, W, b = iv.R, iv.W.weight, iv.W.bias
    # Φ(h) = h + Rᵀ(Wh + b − Rh), written per vector
    expected = _per_vector(h, lambda x: x + R.T @ (W @ x + b - R @ x))
    assert torch.allclose(iv(h), expected, atol=1e-12)
    assert R.shape == (3, 16) and isinstance(iv.W, nn.Linear) and iv.W.out_features == 3


@pytest.mark.parametrize("cls,formula", [
    (OrthDiReFT, lambda iv, x: x + iv.R.T @ (iv.W.weight @ x + iv.W.bias)),          # pyreft's DireftIntervention
    (ConsReFT, lambda iv, x: x + iv.R.T @ (iv.b - iv.R @ x)),
    (LobiReFT, lambda iv, x: x + iv.R.T @ iv.b),
    (DiReFT, lambda iv, x: x + iv.W2.weight.T @ (iv.W1.weight @ x + iv.W1.bias)),      # pyreft's NodireftIntervention
    (NoReFT, lambda iv, x: x + iv.W2.weight.T @ (iv.W.weight @ x + iv.W.bias - iv.W2.weight @ x)),
])
def test_family_formulas_match_direct_computation(cls, formula):
    torch.manual_seed(1)
    iv = cls(12, 2).double()
    h = torch.randn(3, 4, 12, dtype=torch.float64)
    assert torch.allclose(iv(h), _per_vector(h, lambda x: formula(iv, x)), atol=1e-12)


@pytest.mark.parametrize("orthogonal_map", ["householder", "qr"])
def test_R_has_orthonormal_rows_at_init(orthogonal_map):
    for cls in (LoReFT, OrthDiReFT, ConsReFT, LobiReFT):
        iv = cls(32, 5, orthogonal_map=orthogonal_map)
        R = iv.R.double()
        assert torch.allclose(R @ R.T, torch.eye(5, dtype=torch.float64), atol=1e-6)


def test_free_matrices_start_like_pyreft_linear_layers_not_orthonormal():
    """pyreft builds NoReFT's and DiReFT's W2 as nn.Linear (default init, row norms about 0.58)."""
    torch.manual_seed(0)
    for W2 in (NoReFT(512, 8).W2.weight, DiReFT(512, 8).W2.weight):
        norms = W2.detach().norm(dim=1)
        assert ((norms > 0.5) & (norms < 0.66)).all()
        assert W2.abs().max() <= 1 / 512 ** 0.5  # kaiming-uniform bound of nn.Linear
    b = ConsReFT(256, 200).b.detach()  # pyreft: torch.rand(r)
    assert (b >= 0).all() and (b < 1).all() and 0.4 < b.mean() < 0.6


def test_noreft_R_is_free():
    torch.manual_seed(2)
    iv = NoReFT(8, 2).double()
    with torch.no_grad():
        iv.W2.weight.mul_(3.0)  # nothing re-orthonormalises it
    R = iv.R
    h = torch.randn(4, 8, dtype=torch.float64)
    expected = torch.stack([x + R.T @ (iv.W.weight @ x + iv.W.bias - R @ x) for x in h])
    assert torch.allclose(iv(h), expected, atol=1e-12)


# ---- the orthogonal map: torch's Householder map, with a robust sign ----------------------------------

def _torch_orthogonal_and_ours(seed=0, d=64, r=4):
    torch.manual_seed(seed)
    layer = torch.nn.utils.parametrizations.orthogonal(nn.Linear(r, d, bias=False))  # weight [d, r], as pyreft's
    ours = HouseholderRows(r, d)
    p = layer.parametrizations.weight
    ours.set_state(p[0].base, p.original)
    return layer, ours


def _train(get_rt, params, weight_decay, steps=20, seed=1):
    torch.manual_seed(seed)
    h, y = torch.randn(32, 64), torch.randn(32, 4)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)
    out = []
    for _ in range(steps):
        rt = get_rt()
        loss = ((h @ rt - y) ** 2).mean() + (h @ rt @ rt.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(get_rt().detach().clone())
    return out


def test_householder_map_trains_exactly_like_torchs_orthogonal():
    layer, ours = _torch_orthogonal_and_ours()
    assert torch.equal(ours(), layer.weight)
    theirs = _train(lambda: layer.weight, list(layer.parameters()), weight_decay=0.0)
    mine = _train(ours, list(ours.parameters()), weight_decay=0.0)
    assert (mine[-1] - mine[0]).abs().max() > 1e-2  # R did move
    # the same map; our Householder product rounds differently from LAPACK's by an ulp (1.5e-7 here)
    assert max((a - b).abs().max().item() for a, b in zip(theirs, mine)) <= 1e-6


def test_householder_map_stays_orthonormal_under_weight_decay_where_torchs_collapses():
    layer, ours = _torch_orthogonal_and_ours()
    theirs = _train(lambda: layer.weight, list(layer.parameters()), weight_decay=0.1)[-1]
    mine = _train(ours, list(ours.parameters()), weight_decay=0.1)[-1]
    eye = torch.eye(4)
    assert (mine.T @ mine - eye).abs().max() < 1e-6
    assert (theirs.T @ theirs - eye).abs().max() > 0.5  # torch's .int() read the decayed −1 as 0: R = 0


def test_R_stays_orthonormal_under_adamw_with_weight_decay():
    for orthogonal_map in ("householder", "qr"):
        torch.manual_seed(3)
        iv = LoReFT(64, 4, orthogonal_map=orthogonal_map)
        opt = torch.optim.AdamW(iv.parameters(), lr=5e-2, weight_decay=0.5)
        target = torch.randn(32, 64)
        R0 = iv.R.detach().clone()
        for _ in range(50):
            loss = ((iv(torch.randn(32, 64)) - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        R = iv.R.detach()
        assert not torch.allclose(R, R0, atol=1e-3)  # it did train
        assert torch.allclose(R @ R.T, torch.eye(4), atol=1e-5)


def test_qr_map_is_an_option_and_a_bad_map_is_one_line():
    assert isinstance(LoReFT(16, 2, orthogonal_map="qr").rotation, QRRows)
    assert isinstance(LoReFT(16, 2).rotation, HouseholderRows)
    with pytest.raises(ConfigError, match="orthogonal_map='cayley'") as e:
        LoReFT(16, 2, orthogonal_map="cayley")
    assert "\n" not in str(e.value)


def test_householder_state_loads_an_exact_R_from_a_compact_state():
    torch.manual_seed(4)
    src = LoReFT(64, 4)
    _train(src.rotation, list(src.rotation.parameters()), weight_decay=0.0, steps=3)  # X away from −I
    dst = LoReFT(64, 4)
    dst.load_state_dict({"W.weight": src.W.weight, "W.bias": src.W.bias, "rotation.R": src.R.detach()})
    assert torch.equal(dst.R, src.R)
    assert torch.equal(dst.rotation.X.diagonal(), -torch.ones(4))
    assert (dst.rotation.base.T @ dst.rotation.base - torch.eye(64)).abs().max() < 1e-5  # B orthogonal


# ---- dropout ------------------------------------------------------------------------------------------

def test_pyreft_dropout_drops_the_whole_intervened_output():
    torch.manual_seed(5)
    iv = LoReFT(64, 4, dropout=0.5).train()
    with torch.no_grad():
        iv.W.bias.fill_(1.0)
    h = torch.randn(200, 64)
    out = iv(h)
    full = iv.eval()(h)  # h + edit, no dropout
    kept = out != 0
    assert 0.3 < kept.float().mean() < 0.7
    assert torch.allclose(out[kept], 2 * full[kept])  # scaled by 1/(1−p)
    assert (out[~kept] == 0).all()  # h itself is dropped, not only the edit


def test_edit_dropout_leaves_h_and_drops_the_low_rank_vector():
    torch.manual_seed(6)
    iv = LoReFT(64, 4, dropout=0.999, dropout_mode="edit").train()
    with torch.no_grad():
        iv.W.bias.fill_(1.0)
    h = torch.randn(10, 64)
    assert torch.equal(iv(h), h + torch.zeros(10, 4) @ iv.R)  # every low-rank entry dropped: Φ(h) = h
    with pytest.raises(ConfigError, match="dropout_mode='both'"):
        LoReFT(8, 2, dropout_mode="both")


def test_every_family_member_is_registered():
    assert set(INTERVENTIONS) == {"loreft", "noreft", "direft", "orthdireft", "consreft", "lobireft"}
