"""The padding policy (models.set_padding): a decoder pads with a token it never generates, so a
prompt's answer does not depend on which prompts share its batch, with the instruction tasks'
generation penalties or any others."""
import pytest
import torch

from reftbench import models
from reftbench.evaluate import generate

from conftest import tiny_llama

PROMPTS = ["What is 2+3?", "abc", "x", "hello world, again"]
# The instruction tasks' settings (pyreft's ultrafeedback generation_args), and n-gram size 1, under
# which HF bans every id of a row, left padding included.
PENALTIES = [dict(repetition_penalty=1.1, no_repeat_ngram_size=5), dict(repetition_penalty=1.1, no_repeat_ngram_size=1)]


def without_pad(unk: bool):
    """The tiny model's character tokenizer as Llama's (an `<unk>`, no pad) or SmolLM2's / Llama-3's
    (no `<unk>` of its own, no pad) come: nothing to pad with until the policy picks."""
    tok = models.char_tokenizer()
    tok.pad_token = None
    if not unk:
        tok.unk_token = tok.eos_token  # SmolLM2's unk is a token it generates (its <|endoftext|>)
    return tok


def batched_and_single(model, tok, **gen):
    batched = generate(model, tok, PROMPTS, 10, batch_size=8, **gen)
    single = [generate(model, tok, [p], 10, batch_size=1, **gen)[0] for p in PROMPTS]
    return batched, single


@pytest.mark.parametrize("unk", [True, False], ids=["llama-unk", "dedicated"])
@pytest.mark.parametrize("gen", PENALTIES, ids=["rp1.1-ngram5", "rp1.1-ngram1"])
def test_batched_generation_with_penalties_equals_one_by_one(unk, gen):
    model = tiny_llama(dtype="float64", seed=0).model
    tok = without_pad(unk)
    rows = model.get_input_embeddings().num_embeddings
    pad = models.set_padding(model, tok, "decoder")
    assert pad not in (tok.eos_token_id, tok.bos_token_id)
    if unk:  # pyreft's and LLM-Adapters' choice for Llama
        assert tok.pad_token == "<unk>" and model.get_input_embeddings().num_embeddings == rows
    else:  # a new id, its rows zero, never generated
        assert tok.pad_token == models.DEDICATED_PAD and pad == rows
        assert model.get_input_embeddings().num_embeddings == rows + 1
        assert not model.get_input_embeddings().weight[pad].any() and not model.lm_head.weight[pad].any()
    assert model.generation_config.suppress_tokens == [pad]
    batched, single = batched_and_single(model, tok, **gen)
    assert batched == single


def test_padding_with_eos_makes_an_answer_depend_on_its_batch():
    """The hazard the policy removes (today's rule was `pad = EOS` for such tokenizers): with EOS as
    padding, n-gram blocking bans EOS on padded rows only, so they run past where they end alone."""
    loaded = tiny_llama(dtype="float64", seed=0)
    tok = without_pad(unk=True)
    tok.pad_token = tok.eos_token
    batched, single = batched_and_single(loaded.model, tok, **PENALTIES[1])
    assert batched != single


def test_real_pad_of_an_encoder_is_kept():
    from transformers import AutoTokenizer  # noqa: F401  (encoders keep theirs: RoBERTa's positions use it)
    tok = models.char_tokenizer()
    assert models.set_padding(torch.nn.Linear(1, 1), tok, "encoder") == tok.pad_token_id == 0
