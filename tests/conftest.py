import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def tiny_llama(dtype="float32", seed=0, layers=4):
    from reftbench import models
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny-random-llama.yaml")
    cfg.dtype = dtype
    cfg.architecture.num_hidden_layers = layers
    return models.load(cfg, seed=seed)


def tiny_bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    conf = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, num_labels=2)
    model = BertForSequenceClassification(conf).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture
def llama():
    return tiny_llama()


def method_cfg(name="loreft", **kw):
    base = dict(name=name, rank=4, layers="all", positions="f2+l2", share_weights=True, dropout=0.0, lr=None)
    base.update(kw)
    return base
