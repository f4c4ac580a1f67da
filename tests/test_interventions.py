"""The paper's formulas, checked against a direct computation."""
import torch

from reftbench.interventions import DiReFT, LoReFT, NoReFT


def test_loreft_formula_matches_direct_computation():
    torch.manual_seed(0)
    iv = LoReFT(16, 3).double()
    h = torch.randn(2, 5, 16, dtype=torch.float64)
    R, W, b = iv.R, iv.W.weight, iv.W.bias
    # Φ(h) = h + Rᵀ(Wh + b − Rh), written per vector
    expected = torch.stack([torch.stack([x + R.T @ (W @ x + b - R @ x) for x in row]) for row in h])
    assert torch.allclose(iv(h), expected, atol=1e-12)
    assert R.shape == (3, 16) and isinstance(iv.W, torch.nn.Linear) and iv.W.out_features == 3


def test_loreft_R_has_orthonormal_rows_at_init():
    iv = LoReFT(32, 5).double()
    assert torch.allclose(iv.R @ iv.R.T, torch.eye(5, dtype=torch.float64), atol=1e-12)


def test_direft_formula_matches_direct_computation():
    torch.manual_seed(1)
    iv = DiReFT(12, 2).double()
    h = torch.randn(3, 12, dtype=torch.float64)
    W1, b, W2 = iv.W1.weight, iv.W1.bias, iv.W2
    expected = torch.stack([x + W2.T @ (W1 @ x + b) for x in h])
    assert torch.allclose(iv(h), expected, atol=1e-12)
    assert W2.shape == (2, 12) and iv.W1.bias is not None


def test_noreft_is_loreft_with_free_R():
    torch.manual_seed(2)
    iv = NoReFT(8, 2).double()
    with torch.no_grad():
        iv.R_free.mul_(3.0)  # no longer orthonormal, and nothing re-orthonormalises it
    R, W, b = iv.R, iv.W.weight, iv.W.bias
    assert not torch.allclose(R @ R.T, torch.eye(2, dtype=torch.float64))
    h = torch.randn(4, 8, dtype=torch.float64)
    expected = torch.stack([x + R.T @ (W @ x + b - R @ x) for x in h])
    assert torch.allclose(iv(h), expected, atol=1e-12)


def test_R_stays_orthonormal_under_adamw_with_weight_decay():
    torch.manual_seed(3)
    iv = LoReFT(64, 4)
    opt = torch.optim.AdamW(iv.parameters(), lr=5e-2, weight_decay=0.5)
    target = torch.randn(32, 64)
    R0 = iv.R.detach().clone()
    for _ in range(50):
        h = torch.randn(32, 64)
        loss = ((iv(h) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    R = iv.R.detach()
    assert not torch.allclose(R, R0, atol=1e-3)  # it did train
    assert torch.allclose(R @ R.T, torch.eye(4), atol=1e-5)


def _five_adamw_steps(module):
    opt = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.5)
    for _ in range(5):
        loss = module(torch.randn(8, 64)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_torch_householder_orthogonal_drifts_under_weight_decay_which_is_why_we_use_qr():
    """Documents the failure we avoid: torch's default map on a non-square weight."""
    torch.manual_seed(0)
    lin = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(64, 4, bias=False))
    ours = LoReFT(64, 4)
    _five_adamw_steps(lin)
    _five_adamw_steps(ours)
    W, R = lin.weight.detach(), ours.R.detach()
    torch_error = (W @ W.T - torch.eye(4)).abs().max().item()
    our_error = (R @ R.T - torch.eye(4)).abs().max().item()
    assert our_error < 1e-5
    assert our_error < torch_error
