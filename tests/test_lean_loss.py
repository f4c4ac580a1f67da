"""The lean cross-entropy: F.cross_entropy's loss and gradients bit for bit, with one [rows, vocab]
tensor alive instead of three."""
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from reftbench import train
from reftbench.train import LeanCrossEntropy, answer_loss
from test_glu import batch, loss_and_grads


@pytest.mark.parametrize("rows,overwrite", [(1, True), (7, True), (8, False), (21, True)])
def test_loss_and_gradient_bit_for_bit(rows, overwrite):
    g = torch.Generator().manual_seed(rows)
    h = torch.randn(rows, 16, generator=g, requires_grad=True)
    w = torch.randn(5003, 16, generator=g) * 3
    y = torch.randint(0, 5003, (rows,), generator=g)
    ref = F.cross_entropy(h @ w.T, y)
    (ref_grad,) = torch.autograd.grad(ref * 0.3, h)
    lean = LeanCrossEntropy.apply(h @ w.T, y, overwrite)[0]
    (lean_grad,) = torch.autograd.grad(lean * 0.3, h)
    assert torch.equal(lean, ref)
    assert torch.equal(lean_grad, ref_grad)


def test_overwrite_reuses_the_logits_storage():
    logits = torch.randn(9, 50, requires_grad=True) * 1  # a non-leaf, as the head's output is
    y = torch.randint(0, 50, (9,))
    original = logits.detach().clone()
    expected = torch.log_softmax(original, -1)
    fresh = LeanCrossEntropy.apply(original, y, False)[1]
    assert torch.equal(fresh, expected) and torch.equal(original, logits)  # without overwrite: untouched
    _, logp = LeanCrossEntropy.apply(logits, y, True)
    assert logp.data_ptr() == logits.data_ptr() and torch.equal(logp.detach(), expected)


def reference_answer_loss(model, b):
    hidden = train.backbone(model)(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                   use_cache=False).last_hidden_state
    labels = b["labels"][:, 1:]
    keep = labels != -100
    return F.cross_entropy(model.get_output_embeddings()(hidden[:, :-1][keep]).float(), labels[keep])


@pytest.mark.parametrize("name,dtype", [("loreft", "fp32"), ("full", "fp32"), ("loreft", "bf16")])
def test_answer_loss_equals_stock_cross_entropy(name, dtype):
    """Through a whole model (full finetuning: the tied head's weight gradient too), fp32 and bf16 autocast."""
    b = batch(tiny_llama().tokenizer)
    lean, lean_grads = loss_and_grads(tiny_llama().model, name, dtype, b)
    ref, ref_grads = loss_and_grads(tiny_llama().model, name, dtype, b, reference_answer_loss)
    assert torch.equal(lean, ref)
    assert len(lean_grads) == len(ref_grads) > 0
    assert all(torch.equal(a, r) for a, r in zip(lean_grads, ref_grads))


def test_no_grad_evaluation_gives_the_same_loss():
    model = tiny_llama().model
    b = batch(tiny_llama().tokenizer)
    with torch.no_grad():
        assert torch.equal(answer_loss(model, b), reference_answer_loss(model, b))
