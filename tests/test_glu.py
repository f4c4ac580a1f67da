"""The lean gated FFN: bit for bit the stock module's loss and gradients, one [tokens, ffn] tensor less
saved for backward per layer."""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaMLP

from conftest import method_cfg, tiny_llama
from reftbench import glu, methods
from reftbench.train import answer_loss


def batch(tok, n=3, length=12, answer=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, len(tok), (n, length), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "prompt_lengths": [length - answer] * n, "prompt_offsets": [0] * n}


def stock(model):
    for m in model.modules():
        if isinstance(m, glu.LeanGLU):
            m.__class__ = LlamaMLP
    return model


def loss_and_grads(model, name, dtype, b, loss_fn=answer_loss):
    torch.manual_seed(0)
    cfg = method_cfg(name) if name == "loreft" else {"name": name, "rank": 4, "dropout": 0.0, "lr": None}
    method = methods.build(cfg, model) if name != "full" else None
    params = method.trainable_parameters() if method else [p.requires_grad_(True) for p in model.parameters()]
    ctx = method.context(b) if method else torch.enable_grad()
    with ctx, torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = loss_fn(model, b)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


def test_load_switches_every_llama_ffn():
    model = tiny_llama().model
    mlps = [layer.mlp for layer in model.model.layers]
    assert all(isinstance(m, glu.LeanGLU) and isinstance(m, LlamaMLP) for m in mlps)
    assert glu.lean_mlps(model) == len(mlps)  # idempotent
    assert "mlp.gate_proj.weight" in next(iter(model.model.layers)).state_dict()


@pytest.mark.parametrize("name,dtype", [("loreft", "fp32"), ("lora", "fp32"), ("full", "fp32"), ("loreft", "bf16")])
def test_same_loss_and_gradients_bit_for_bit(name, dtype):
    b = batch(tiny_llama().tokenizer)
    lean_loss, lean_grads = loss_and_grads(tiny_llama().model, name, dtype, b)
    ref_loss, ref_grads = loss_and_grads(stock(tiny_llama().model), name, dtype, b)
    assert torch.equal(lean_loss, ref_loss)
    assert len(lean_grads) == len(ref_grads) > 0
    assert all(torch.equal(a, r) for a, r in zip(lean_grads, ref_grads))


def saved_bytes(model, b) -> int:
    method = methods.build(method_cfg("loreft"), model)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), method.context(b):
        answer_loss(model, b)
    params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())
              + list(method.parameters()) + list(method.buffers())}
    return sum(n for k, n in seen.items() if k not in params)


def test_saves_one_ffn_tensor_less_per_layer():
    loaded = tiny_llama()
    b = batch(loaded.tokenizer)
    cfg = loaded.model.config
    tokens = b["input_ids"].numel()
    one = tokens * cfg.intermediate_size * 4
    lean = saved_bytes(loaded.model, b)
    ref = saved_bytes(stock(tiny_llama().model), b)
    # LoReFT edits each block's output, so block 0's FFN sees no input that needs a gradient
    assert ref - lean == (cfg.num_hidden_layers - 1) * one


def test_inference_takes_the_stock_path():
    model = tiny_llama().model
    x = torch.randn(2, 5, model.config.hidden_size)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        lean = mlp(x)
    assert torch.equal(lean, LlamaMLP.forward(mlp, x))


def test_only_silu_ffns_are_switched():
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, hidden_act="gelu"))
    assert glu.lean_mlps(model) == 0
    assert not any(isinstance(m, glu.LeanGLU) for m in model.modules())
