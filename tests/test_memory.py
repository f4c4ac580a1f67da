"""Memory: the dedicated pad token's resize must not keep the old embedding's pages of the mapped weights
file resident beside its copy (the +0.1 GiB of SmolLM2's peak RSS)."""
import re
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reftbench import models

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def rss_file_kib() -> int:
    return int(re.search(r"RssFile:\s+(\d+)", open("/proc/self/status").read()).group(1))


def test_the_resize_leaves_no_pages_of_the_old_embedding_resident(tmp_path):
    conf = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(conf).save_pretrained(tmp_path)  # an 8 MiB embedding in model.safetensors
    model = LlamaForCausalLM.from_pretrained(tmp_path)
    w = model.get_input_embeddings().weight
    expected = w.detach().clone()
    assert models.release_file_pages(expected.data_ptr(), expected.nbytes) is False  # anonymous memory: untouched
    before = rss_file_kib()
    assert float(w.sum()) == pytest.approx(float(expected.sum()), rel=1e-6)  # every page of it read
    touched = rss_file_kib()
    assert models.release_file_pages(w.data_ptr(), w.nbytes) is True
    assert rss_file_kib() < touched - 6 * 1024  # ~8 MiB no longer resident
    assert torch.equal(w, expected)  # a mapped file's pages come back from the file, unchanged
    assert touched >= before
