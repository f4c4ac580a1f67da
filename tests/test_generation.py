"""Generation: interventions act on the prompt during prefill, decoding runs on the KV cache."""
import pytest
import torch

from reftbench import methods
from reftbench.evaluate import generate

from conftest import method_cfg, tiny_llama

PROMPTS = ["What is 2+3?", "abc", "The quick brown fox jumps", "x", "hello world, again and again"]


@pytest.fixture(scope="module")
def setup():
    loaded = tiny_llama(dtype="float64", seed=1)
    torch.manual_seed(0)
    m = methods.build(method_cfg(rank=4, positions="f3+l3"), loaded.model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # a trained-looking intervention, not the init
    return loaded, m


def test_intervention_changes_generation(setup):
    loaded, m = setup
    frozen = generate(loaded.model, loaded.tokenizer, PROMPTS, 12, batch_size=8)
    edited = generate(loaded.model, loaded.tokenizer, PROMPTS, 12, batch_size=8, method=m)
    assert frozen != edited


def test_kv_cache_equals_recompute_without_cache(setup):
    loaded, m = setup
    cached = generate(loaded.model, loaded.tokenizer, PROMPTS, 12, batch_size=8, method=m)
    recomputed = generate(loaded.model, loaded.tokenizer, PROMPTS, 12, batch_size=8, method=m, use_cache=False)
    assert cached == recomputed


def test_batched_left_padding_equals_one_by_one(setup):
    loaded, m = setup
    batched = generate(loaded.model, loaded.tokenizer, PROMPTS, 12, batch_size=8, method=m)
    single = [generate(loaded.model, loaded.tokenizer, [p], 12, batch_size=1, method=m)[0] for p in PROMPTS]
    assert batched == single


def test_interventions_run_once_per_layer_during_generation(setup, monkeypatch):
    """Prefill only: the decode steps run on the cache with no intervention call."""
    loaded, m = setup
    calls = []
    for name, iv in m.interventions.items():
        monkeypatch.setattr(iv, "delta", lambda h, _f=iv.delta, _n=name: calls.append(_n) or _f(h))
    out = generate(loaded.model, loaded.tokenizer, ["hello there"], 6, batch_size=1, method=m)[0]
    assert len(out) >= 2  # there were decode steps after the prefill
    assert sorted(calls) == sorted(m.interventions.keys())
    assert m._index is None  # the context is closed after generation


def test_beam_search_intervenes_on_every_beam(setup):
    """LLM-Adapters' protocol decodes with 4 beams: each prompt's beams are rows of their own, and the
    intervention must act on all of them, so batched beam search equals one prompt at a time."""
    loaded, m = setup
    batched = generate(loaded.model, loaded.tokenizer, PROMPTS, 6, batch_size=8, method=m, num_beams=4)
    single = [generate(loaded.model, loaded.tokenizer, [p], 6, batch_size=1, method=m, num_beams=4)[0] for p in PROMPTS]
    assert batched == single
    assert batched != generate(loaded.model, loaded.tokenizer, PROMPTS, 6, batch_size=8, num_beams=4)
