"""LoRA and DoRA runs save in peft's own format too: PeftModel.from_pretrained(base, folder) rebuilds
the trained model exactly, and our own loader still reads the folder."""
import json

import pytest
import torch
from conftest import tiny_llama

from reftbench import methods


def _trained(name, tmp_path):
    """A LoRA/DoRA method on the tiny Llama after two optimiser steps (so B is no longer 0)."""
    loaded = tiny_llama()
    model, tok = loaded.model, loaded.tokenizer
    method = methods.build(dict(name=name, rank=4, alpha=8, dropout=0.0, target_modules="auto", lr=None), model)
    opt = torch.optim.AdamW(method.trainable_parameters(), lr=1e-2)
    ids = tok(["12 + 30 = 42", "7 - 3 = 4"], return_tensors="pt", padding=True)
    method.train(True)
    for _ in range(2):
        loss = model(**ids, labels=ids["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    method.train(False)
    method.save(tmp_path / "intervention")
    return model, method, ids


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_peft_from_pretrained_reproduces_the_trained_logits(name, tmp_path):
    from peft import PeftModel
    model, method, ids = _trained(name, tmp_path)
    assert any(v.abs().sum() > 0 for k, v in method.state_dict().items() if "B" in k)
    with torch.no_grad():
        ours = model(**ids).logits
        base = tiny_llama().model  # the same random weights (seeded), no adapters
        frozen = base(**ids).logits
        folder = tmp_path / "intervention"
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == 4 and config["use_dora"] == (name == "dora")
        theirs = PeftModel.from_pretrained(base, folder).eval()(**ids).logits
    assert not torch.allclose(ours, frozen, atol=1e-4)  # the adapter changes the output
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    with torch.no_grad():  # our own loader reads the same folder (method.json, weights.safetensors)
        fresh = tiny_llama().model
        methods.load(folder, fresh)
        torch.testing.assert_close(fresh(**ids).logits, ours, rtol=0, atol=0)
