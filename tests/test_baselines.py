"""Baselines behind the method interface: LoRA, DoRA, RED, BitFit and full finetuning."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from reftbench import methods
from reftbench.data import collate_train, encode_example
from reftbench.errors import ConfigError
from reftbench.architectures import backbone
from reftbench.models import char_tokenizer, count_params
from reftbench.train import answer_loss

from conftest import method_cfg, tiny_bert, tiny_llama

CONF = Path(__file__).resolve().parents[1] / "conf" / "intervention"
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


class Tiny:
    """A tiny random decoder and the character tokenizer."""

    def __init__(self, family="llama", seed=0, **arch):
        from transformers import AutoConfig, AutoModelForCausalLM
        self.tokenizer = tok = char_tokenizer()
        conf = AutoConfig.for_model(family, vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id, **arch)
        torch.manual_seed(seed)
        self.model = AutoModelForCausalLM.from_config(conf).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)


def tiny_qwen2(seed=0):  # Qwen2 has q, k, v biases: the decoder BitFit can train
    return Tiny("qwen2", seed)


def _batch(tok):
    exs = [encode_example(tok, "2+3=", " 5", 64), encode_example(tok, "10-4=", " 6", 64),
           encode_example(tok, "a", " bb", 64)]
    return collate_train(exs, tok.pad_token_id)


def _logits(model, method, batch):
    with torch.no_grad(), method.context(batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _perturb(params):
    # LoRA/DoRA start with B = 0, so A gets no gradient and the edit is the identity: move away first.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _build(name, loaded, **kw):
    cfg = method_cfg(name=name, **kw) if name in ("loreft", "noreft", "direft") else dict(name=name, **kw)
    return methods.build(cfg, loaded.model)


# (method, options, model factory): every method on a model it supports
CASES = [
    ("lora", dict(rank=4, alpha=8), tiny_llama),
    ("dora", dict(rank=4, alpha=8), tiny_llama),
    ("red", dict(layers="1;3"), tiny_llama),
    ("full", {}, tiny_llama),
    ("bitfit", {}, tiny_qwen2),
]


# ---- what trains ------------------------------------------------------------------------------

def _expected_trainable(name, model):
    names = dict(model.named_parameters())
    if name == "lora":
        return {n for n in names if ".lora_A." in n or ".lora_B." in n}
    if name == "dora":
        return {n for n in names if ".lora_A." in n or ".lora_B." in n or ".lora_magnitude_vector." in n}
    if name == "full":
        return set(names)
    if name == "bitfit":
        return {n for n in names if n.endswith(".bias")}
    return set()  # red: nothing of the model


@pytest.mark.parametrize("name,kw,factory", CASES, ids=[c[0] for c in CASES])
def test_exactly_the_method_parameters_train(name, kw, factory):
    loaded = factory()
    m = _build(name, loaded, **kw)
    model = loaded.model
    trainable = {id(p) for p in m.trainable_parameters()}
    assert len(trainable) == len(m.trainable_parameters())  # no parameter twice in the optimiser
    in_model = {n for n, p in model.named_parameters() if p.requires_grad}
    assert in_model == _expected_trainable(name, model)
    # everything with requires_grad, in the model or the method, is exactly what the optimiser gets
    everywhere = {id(p) for p in [*model.parameters(), *m.parameters()] if p.requires_grad}
    assert everywhere == trainable
    assert {id(p) for p in m.parameters()} == trainable  # the method's state is its trainable tensors
    assert type(model).__name__.endswith("ForCausalLM") and backbone(model) is model.model


def test_bitfit_and_full_on_an_encoder_leave_the_head_to_the_task_loop():
    model = tiny_bert()
    bitfit = methods.build({"name": "bitfit"}, model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("bert.") and n.endswith(".bias") for n in names)
    assert not any(p.requires_grad for p in model.classifier.parameters())
    # hidden 32, FFN 64, 3 layers: per layer q,k,v,o (4·32) + 2 LayerNorms (2·32) + FFN in (64) and out (32);
    # plus the embedding LayerNorm (32); the pooler belongs to the head (RoBERTa's dense layer)
    assert bitfit.param_counts()["trainable"] == 3 * (4 * 32 + 2 * 32 + 64 + 32) + 32 == 896
    assert not any(p.requires_grad for p in model.bert.pooler.parameters())
    model = tiny_bert()
    full = methods.build({"name": "full"}, model)
    head = 32 * 2 + 2 + 32 * 32 + 32  # classifier + pooler
    counts = full.param_counts()
    assert counts["trainable"] == count_params(model) - head == count_params(model.bert) - count_params(model.bert.pooler)
    assert not any(p.requires_grad for p in model.classifier.parameters())
    assert counts["percent"] == pytest.approx(100 * counts["trainable"] / count_params(model))


def test_red_edits_the_ffn_output_of_chosen_layers_only():
    loaded = tiny_llama()
    m = methods.build({"name": "red", "layers": "1"}, loaded.model)
    blocks = loaded.model.model.layers
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        plain0 = blocks[0].mlp(x)
        m.edits["layer1"].scale.uniform_(0.5, 1.5)
        m.edits["layer1"].bias.normal_()
        edited = blocks[1].mlp(x)
        m.remove()
        plain = blocks[1].mlp(x)
        assert torch.allclose(edited, plain * m.edits["layer1"].scale + m.edits["layer1"].bias)
        assert torch.equal(blocks[0].mlp(x), plain0)


def test_red_starts_as_the_identity():
    loaded = tiny_llama()
    batch = _batch(loaded.tokenizer)
    with torch.no_grad():
        before = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    m = methods.build({"name": "red"}, loaded.model)
    assert all(torch.equal(e.scale, torch.ones(64)) and torch.equal(e.bias, torch.zeros(64)) for e in m.edits.values())
    assert torch.equal(_logits(loaded.model, m, batch), before)


def test_red_and_lora_edit_cached_decode_steps_too():
    # Unlike ReFT (prompt positions only), these edit every position: cached greedy decoding must
    # agree with recomputing the whole sequence without a cache.
    for name in ("red", "lora"):
        loaded = tiny_llama()
        m = methods.build({"name": name}, loaded.model)
        _perturb(m.parameters())
        ids = torch.tensor([[1, 40, 41, 42, 43]])
        with torch.no_grad():
            out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                        do_sample=False, pad_token_id=0)
            logits = loaded.model(input_ids=out).logits[0, ids.shape[1] - 1:-1]
        assert logits.argmax(-1).tolist() == out[0, ids.shape[1]:].tolist(), name


# ---- counts -----------------------------------------------------------------------------------

def test_counts_match_hand_computation():
    # tiny llama: d 64, FFN 128, 4 heads of 16, 2 KV heads (k, v out 32), 4 layers
    per_layer = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "up_proj": (64, 128),
                 "down_proj": (128, 64)}
    r, layers = 4, 4
    lora = layers * sum(r * (i + o) for i, o in per_layer.values())
    dora = lora + layers * sum(o for _, o in per_layer.values())
    expected = {"lora": lora, "dora": dora, "red": 2 * 2 * 64, "full": None}
    for name, kw, factory in CASES[:4]:
        loaded = factory()
        base = count_params(loaded.model)
        counts = _build(name, loaded, **kw).param_counts()
        assert counts["base"] == base
        if name == "full":
            assert counts["trainable"] == base and counts["percent"] == 100.0
        else:
            assert counts["trainable"] == expected[name], name
            assert counts["percent"] == pytest.approx(100 * expected[name] / (base + expected[name]))
    qwen = tiny_qwen2()
    counts = methods.build({"name": "bitfit"}, qwen.model).param_counts()
    assert counts["trainable"] == 2 * (32 + 16 + 16)  # q, k, v biases; o_proj and the MLP have none
    assert counts["percent"] == pytest.approx(100 * 128 / count_params(qwen.model))


def test_lora_on_llama7b_matches_the_paper():
    # ReFT Table 1 quotes LoRA on LLaMA-7B (rank 32, q,k,v,up,down) at 0.826%.
    from transformers import LlamaConfig, LlamaForCausalLM
    for name, extra in (("lora", 0), ("dora", 32 * (3 * 4096 + 11008 + 4096))):
        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                                 num_attention_heads=32, vocab_size=32000))
        for p in model.parameters():
            p.requires_grad_(False)
        counts = methods.build(OmegaConf.load(CONF / f"{name}.yaml"), model).param_counts()
        # per layer: q, k, v 32·(4096+4096) each, up 32·(4096+11008), down 32·(11008+4096)
        assert counts["trainable"] == 32 * 32 * (3 * 8192 + 2 * 15104) + extra
        assert counts["base"] == 6_738_415_616
        if name == "lora":
            assert counts["trainable"] == 56_098_816
            assert round(counts["percent"], 3) == 0.826


# ---- one optimiser step -----------------------------------------------------------------------

@pytest.mark.parametrize("name,kw,factory", CASES, ids=[c[0] for c in CASES])
def test_one_step_changes_all_trainable_tensors_and_nothing_else(name, kw, factory):
    loaded = factory()
    m = _build(name, loaded, **kw)
    model = loaded.model
    params = m.trainable_parameters()
    _perturb(params)
    trainable = {id(p) for p in params}
    model_before = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    method_before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    batch = _batch(loaded.tokenizer)
    m.train()
    with m.context(batch):
        loss = answer_loss(model, batch)
    loss.backward()
    opt.step()
    m.eval()
    for k, v in model.state_dict(keep_vars=True).items():
        changed = not torch.equal(model_before[k], v.detach())
        assert changed == (id(v) in trainable), k
    assert all(not torch.equal(method_before[k], v) for k, v in m.state_dict().items())


def test_dropout_follows_the_method_mode_and_the_base_stays_in_eval():
    for name in ("lora", "dora"):
        loaded = tiny_llama()
        m = methods.build({"name": name, "rank": 4, "dropout": 0.5}, loaded.model)
        _perturb(m.trainable_parameters())
        batch = _batch(loaded.tokenizer)
        mine = {id(x) for x in m.modules()}
        base = [mod for mod in loaded.model.modules() if id(mod) not in mine and not hasattr(mod, "lora_A")]
        m.train()
        assert not any(mod.training for mod in base)
        torch.manual_seed(0)
        a = _logits(loaded.model, m, batch)
        b = _logits(loaded.model, m, batch)
        assert not torch.equal(a, b), name
        m.eval()
        assert not any(mod.training for mod in loaded.model.modules() if id(mod) not in mine)
        assert torch.equal(_logits(loaded.model, m, batch), _logits(loaded.model, m, batch))


# ---- save and load ----------------------------------------------------------------------------

ROUND_TRIP = [(n, dict(share_weights=False, layers="0;2"), tiny_llama) for n in ("loreft", "noreft", "direft")]


@pytest.mark.parametrize("name,kw,factory", CASES + ROUND_TRIP, ids=[c[0] for c in CASES + ROUND_TRIP])
def test_save_load_reproduces_the_outputs(tmp_path, name, kw, factory):
    a = factory(seed=3)
    m = _build(name, a, **kw)
    _perturb(m.parameters())
    batch = _batch(a.tokenizer)
    expected = _logits(a.model, m, batch)
    m.save(tmp_path / "iv")
    b = factory(seed=3)
    m2 = methods.load(tmp_path / "iv", b.model)
    assert torch.equal(_logits(b.model, m2, batch), expected)
    assert type(m2) is type(m) and m2.config == m.config
    assert m2.param_counts() == m.param_counts()


def test_full_finetuning_with_tied_embeddings_saves_one_copy(tmp_path):
    from safetensors.torch import load_file
    a = Tiny("llama", seed=5, tie_word_embeddings=True)
    m = methods.build({"name": "full"}, a.model)
    assert a.model.lm_head.weight is a.model.model.embed_tokens.weight
    assert m.param_counts()["trainable"] == count_params(a.model)  # the tied matrix once
    _perturb(m.trainable_parameters())
    batch = _batch(a.tokenizer)
    expected = _logits(a.model, m, batch)
    m.save(tmp_path / "iv")
    saved = load_file(str(tmp_path / "iv" / "weights.safetensors"))
    assert sum(v.numel() for v in saved.values()) == count_params(a.model)
    b = Tiny("llama", seed=6, tie_word_embeddings=True)
    m2 = methods.load(tmp_path / "iv", b.model)
    assert b.model.lm_head.weight is b.model.model.embed_tokens.weight
    assert torch.equal(_logits(b.model, m2, batch), expected)


# ---- options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lora", "dora", "red", "full", "bitfit"])
def test_shipped_yaml_builds(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert list(cfg)[0] == "name" and cfg.name == name
    loaded = tiny_qwen2() if name == "bitfit" else tiny_llama()
    m = methods.build(cfg, loaded.model)
    assert m.param_counts()["trainable"] > 0
    if name in ("lora", "dora"):
        assert m.config.rank == 32 and m.config.alpha == 64 and list(m.config.target_modules) == TARGETS


def test_target_modules_as_a_string(tmp_path):
    loaded = tiny_llama()
    m = methods.build({"name": "lora", "rank": 2, "target_modules": "q_proj;v_proj"}, loaded.model)
    assert m.param_counts()["trainable"] == 4 * 2 * ((64 + 64) + (64 + 32))
    m.save(tmp_path / "iv")
    assert methods.load(tmp_path / "iv", tiny_llama().model).param_counts() == m.param_counts()


@pytest.mark.parametrize("cfg,match", [
    (dict(name="lora", rank=0), "rank=0"),
    (dict(name="dora", rank="8"), "rank=8"),
    (dict(name="lora", alpha=0), "alpha=0"),
    (dict(name="lora", alpha="x"), "alpha=x"),
    (dict(name="lora", dropout=1.5), "dropout=1.5"),
    (dict(name="lora", target_modules="q_proj;qkv"), "'qkv'"),
    (dict(name="dora", target_modules=[]), "empty"),
    (dict(name="lora", positions="f7+l7"), "no option 'positions'"),
    (dict(name="red", layers="0;9"), "layer 9"),
    (dict(name="red", layers="x"), "malformed"),
    (dict(name="bitfit"), "no bias terms"),
])
def test_bad_options_are_one_clear_line(cfg, match):
    loaded = tiny_llama()
    with pytest.raises(ConfigError, match=match) as e:
        methods.check(cfg, loaded.model)
    assert "\n" not in str(e.value)
    assert not any(p.requires_grad for p in loaded.model.parameters())  # a failed check changes nothing
