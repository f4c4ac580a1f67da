"""ReFT methods on real (tiny) transformer stacks: counts, training, loss, save/load, encoders."""
import pytest
import torch

from reftbench import methods
from reftbench.data import collate_train, encode_example
from reftbench.errors import ConfigError
from reftbench.models import count_params
from reftbench.train import answer_loss

from conftest import ROOT, method_cfg, tiny_bert, tiny_llama


def _batch(tok):
    exs = [encode_example(tok, "2+3=", " 5", 64), encode_example(tok, "10-4=", " 6", 64),
           encode_example(tok, "a", " bb", 64)]
    return collate_train(exs, tok.pad_token_id)


PER_INTERVENTION = {  # trainable parameters per intervention, d = hidden size, r = rank
    "loreft": lambda d, r: r * d + r * d + r,      # R (its parameter X, d×r) + W (r×d) + b
    "noreft": lambda d, r: r * d + r * d + r,      # W2 + W + b
    "direft": lambda d, r: r * d + r * d + r,      # W2 + W1 + b
    "orthdireft": lambda d, r: r * d + r * d + r,  # R + W + b
    "consreft": lambda d, r: r * d + r,            # R + b
    "lobireft": lambda d, r: r * d + r,            # R + b
}


@pytest.mark.parametrize("name", sorted(PER_INTERVENTION))
@pytest.mark.parametrize("share,groups", [(True, 1), (False, 2)])
def test_param_counts_match_hand_computation(llama, name, share, groups):
    m = methods.build(method_cfg(name=name, rank=3, layers="1;3", share_weights=share), llama.model)
    counts = m.param_counts()
    base = count_params(llama.model)
    assert counts["trainable"] == 2 * groups * PER_INTERVENTION[name](64, 3)
    assert counts["base"] == base
    assert counts["percent"] == pytest.approx(100 * counts["trainable"] / (base + counts["trainable"]))


@pytest.mark.parametrize("name", sorted(PER_INTERVENTION))
def test_dry_run_counts_for_every_shipped_yaml(name):
    """conf/intervention/<name>.yaml plans on LLaMA-7B's architecture (meta device, no weights)."""
    from hydra import compose, initialize_config_dir
    from reftbench.run import plan
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["dry_run=true", "model=llama-7b", f"intervention={name}",
                                           "intervention.rank=8", "intervention.positions=f7+l7"])
    assert plan(cfg)["params"]["trainable"] == 32 * PER_INTERVENTION[name](4096, 8)


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


@pytest.mark.parametrize("name", sorted(PER_INTERVENTION))
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
    (dict(orthogonal_map="cayley"), "orthogonal_map='cayley'"), (dict(dropout_mode="all"), "dropout_mode='all'"),
    (dict(name="direft", orthogonal_map="qr"), "no option 'orthogonal_map'"),
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


def test_saved_householder_R_is_compact_and_reloads_exactly(tmp_path):
    """B (d×d) is not written: R is, and loading rebuilds B around it with X = −I."""
    from safetensors.torch import load_file
    a = tiny_llama(seed=3)
    m = methods.build(method_cfg(layers="0;2"), a.model)
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-2)
    batch = _batch(a.tokenizer)
    for _ in range(3):  # X away from −I
        with m.context(batch):
            loss = answer_loss(a.model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.save(tmp_path / "iv")
    keys = load_file(str(tmp_path / "iv" / "weights.safetensors")).keys()
    assert "interventions.layer0_tied.rotation.R" in keys and not any(k.endswith((".base", ".X")) for k in keys)
    m2 = methods.load(tmp_path / "iv", tiny_llama(seed=3).model)
    for k, iv in m.interventions.items():
        assert torch.equal(iv.R, m2.interventions[k].R)


def test_runs_saved_with_the_qr_map_before_it_was_an_option_still_load(tmp_path):
    import json
    a = tiny_llama(seed=3)
    m = methods.build(method_cfg(layers="0;2", orthogonal_map="qr"), a.model)
    m.save(tmp_path / "iv")
    config = json.loads((tmp_path / "iv" / "method.json").read_text())
    del config["orthogonal_map"], config["dropout_mode"]
    (tmp_path / "iv" / "method.json").write_text(json.dumps(config))
    m2 = methods.load(tmp_path / "iv", a.model)
    assert m2.config.orthogonal_map == "qr"
    assert all(torch.equal(iv.R, m2.interventions[k].R) for k, iv in m.interventions.items())


def test_load_puts_the_weights_on_the_model_s_device(tmp_path):
    """The meta device stands in for a GPU here: the loaded method follows the model."""
    a = tiny_llama(seed=3)
    methods.build(method_cfg(layers="0;2"), a.model).save(tmp_path / "iv")
    b = tiny_llama(seed=3).model.to("meta")
    m2 = methods.load(tmp_path / "iv", b)
    assert {p.device.type for p in m2.state_dict().values()} == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_load_puts_the_weights_on_the_gpu_in_fp32(tmp_path):
    a = tiny_llama(seed=3)
    m = methods.build(method_cfg(layers="0;2"), a.model)
    m.save(tmp_path / "iv")
    b = tiny_llama(dtype="bfloat16", seed=3).model.to("cuda")
    m2 = methods.load(tmp_path / "iv", b)
    assert {(p.device.type, p.dtype) for p in m2.trainable_parameters()} == {("cuda", torch.float32)}
    batch = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in _batch(a.tokenizer).items()}
    with torch.no_grad(), m2.context(batch):
        b(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


@pytest.mark.parametrize("mode", ["pyreft", "edit"])
def test_dropout_acts_on_intervened_positions_only(llama, mode):
    """pyreft: dropout(h + edit) at the intervened positions (h itself is dropped or scaled);
    edit: only the edit is dropped, h passes. Nothing else moves in either mode."""
    p = 0.999
    m = methods.build(method_cfg(layers="0", positions="f2+l2", dropout=p, dropout_mode=mode), llama.model)
    batch = _batch(llama.tokenizer)
    outputs = {}
    hook = llama.model.model.layers[0].register_forward_hook(lambda mod, a, out: outputs.setdefault(
        "h", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            llama.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            plain = outputs.pop("h")
            m.train()
            torch.manual_seed(0)
            with m.context(batch):
                llama.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            edited = outputs.pop("h")
    finally:
        hook.remove()
    rows, cols = m.positions.index(batch["prompt_lengths"], batch["prompt_offsets"], True)["tied"]
    at = torch.zeros(plain.shape[:2], dtype=torch.bool)
    at[rows, cols] = True
    assert torch.equal(edited[~at], plain[~at])
    if mode == "pyreft":
        assert (edited[at] == 0).float().mean() > 0.99  # almost every entry of h + edit dropped
    else:
        assert torch.equal(edited[at], plain[at])  # every edit dropped, h kept
