"""ReFT methods on real (tiny) transformer stacks: counts, training, loss, save/load, encoders."""
import pytest
import torch

from reftbench import methods
from reftbench.data import collate_train, encode_example
from reftbench.errors import ConfigError
from reftbench.models import count_params
from reftbench.train import answer_loss

from conftest import method_cfg, tiny_bert, tiny_llama


def _batch(tok):
    exs = [encode_example(tok, "2+3=", " 5", 64), encode_example(tok, "10-4=", " 6", 64),
           encode_example(tok, "a", " bb", 64)]
    return collate_train(exs, tok.pad_token_id)


@pytest.mark.parametrize("share,groups", [(True, 1), (False, 2)])
def test_param_counts_match_hand_computation(llama, share, groups):
    m = methods.build(method_cfg(rank=3, layers="1;3", share_weights=share), llama.model)
    d, r = 64, 3
    per = r * d + r * d + r  # R (r×d) + W (r×d) + b (r)
    counts = m.param_counts()
    base = count_params(llama.model)
    assert counts["trainable"] == 2 * groups * per
    assert counts["base"] == base
    assert counts["percent"] == pytest.approx(100 * counts["trainable"] / (base + counts["trainable"]))


def test_only_intervention_parameters_train(llama):
    m = methods.build(method_cfg(), llama.model)
    assert not any(p.requires_grad for p in llama.model.parameters())
    assert all(p.requires_grad for p in m.trainable_parameters())
    batch = _batch(llama.tokenizer)
    before = {k: v.clone() for k, v in llama.model.state_dict().items()}
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    with m.context(batch):
        loss = answer_loss(llama.model, batch)
    loss.backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in llama.model.state_dict().items())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.trainable_parameters())


def test_answer_loss_equals_full_logit_loss_on_answer_tokens(llama):
    batch = _batch(llama.tokenizer)
    m = methods.build(method_cfg(), llama.model)
    with m.context(batch):
        ours = answer_loss(llama.model, batch)
        full = llama.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss
    assert torch.allclose(ours, full, atol=1e-5)


def test_training_lowers_the_loss_and_keeps_R_orthonormal(llama):
    from omegaconf import OmegaConf
    from reftbench.train import train
    tok = llama.tokenizer
    exs = [encode_example(tok, f"{a}+{b}=", f" {a + b}", 64) for a in range(6) for b in range(6)]
    m = methods.build(method_cfg(rank=2), llama.model)
    batch = collate_train(exs, tok.pad_token_id)
    with torch.no_grad(), m.context(batch):
        before = answer_loss(llama.model, batch).item()
    cfg = OmegaConf.create(dict(epochs=None, max_steps=40, lr=2e-2, batch_size=12, grad_accum=1,
                                weight_decay=0.1, warmup_ratio=0.1, max_length=64, max_grad_norm=1.0))
    train(llama.model, m, exs, cfg, lambda b: collate_train(b, tok.pad_token_id), seed=0)
    with torch.no_grad(), m.context(batch):
        after = answer_loss(llama.model, batch).item()
    assert after < before - 0.3
    for iv in m.interventions.values():
        R = iv.R.detach()
        assert torch.allclose(R @ R.T, torch.eye(2), atol=1e-5)


@pytest.mark.parametrize("name", ["loreft", "noreft", "direft"])
def test_save_load_round_trip(tmp_path, name):
    a = tiny_llama(seed=3)
    m = methods.build(method_cfg(name=name, share_weights=False, layers="0;2"), a.model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    batch = _batch(a.tokenizer)
    with torch.no_grad(), m.context(batch):
        expected = a.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    m.save(tmp_path / "iv")
    b = tiny_llama(seed=3)
    m2 = methods.load(tmp_path / "iv", b.model)
    with torch.no_grad(), m2.context(batch):
        got = b.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(expected, got)
    assert type(m2) is type(m) and m2.config == m.config


@pytest.mark.parametrize("kw,match", [
    (dict(rank=0), "rank=0"), (dict(rank=65), "rank=65"), (dict(layers="0;9"), "layer 9"),
    (dict(layers="a;b"), "malformed"), (dict(positions="f7l7"), "malformed"), (dict(dropout=1.5), "dropout"),
])
def test_bad_options_are_one_clear_line(llama, kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        methods.build(method_cfg(**kw), llama.model)
    assert "\n" not in str(e.value)


def test_unknown_method_and_option(llama):
    with pytest.raises(ConfigError, match="unknown"):
        methods.build({"name": "nope"}, llama.model)
    with pytest.raises(ConfigError, match="no option 'rnak'"):
        methods.build(dict(method_cfg(), rnak=3), llama.model)


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ConfigError, match="'gpt2' is not supported"):
        methods.build(method_cfg(), model)


def test_encoder_positions_and_classifier_output():
    model = tiny_bert()
    m = methods.build(method_cfg(rank=2, positions="f1", layers="2"), model)
    with torch.no_grad():
        for iv in m.interventions.values():
            iv.W.bias.fill_(2.0)
    ids = torch.randint(5, 100, (2, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_lengths": [7, 7],
             "prompt_offsets": [0, 0]}
    with torch.no_grad():
        plain = model.bert(input_ids=ids).last_hidden_state
        with m.context(batch):
            edited = model.bert(input_ids=ids).last_hidden_state
            logits = model(input_ids=ids).logits
    moved = (edited - plain).abs().amax(-1) > 0
    assert moved[:, 0].all() and not moved[:, 1:].any()  # f1 = the [CLS] position only, last layer
    assert logits.shape == (2, 2)


@pytest.mark.parametrize("family", ["gemma", "mistral"])
def test_other_llama_family_decoders(family):
    from transformers import AutoConfig, AutoModelForCausalLM
    conf = AutoConfig.for_model(family, vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(conf).eval()
    m = methods.build(method_cfg(rank=2, positions="l1"), model)
    with torch.no_grad():
        for iv in m.interventions.values():
            iv.W.bias.fill_(1.0)
    ids = torch.randint(3, 40, (1, 6))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_lengths": [6], "prompt_offsets": [0]}
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with m.context(batch):
            edited = model(input_ids=ids).logits
    moved = (edited - plain).abs().amax(-1)[0] > 0
    assert moved.tolist() == [False] * 5 + [True]  # causal: only the last position sees the edit


def test_hydra_list_layers_save_as_plain_json(tmp_path, llama):
    from omegaconf import OmegaConf
    m = methods.build(OmegaConf.create(method_cfg(layers=[0, 2])), llama.model)
    m.save(tmp_path / "iv")
    assert '"layers": [\n    0,\n    2\n  ]' in (tmp_path / "iv" / "method.json").read_text()
    assert m.layer_ids == [0, 2]
