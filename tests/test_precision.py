"""One precision policy for every method (trainer.precision), checked in bf16 on the CPU."""
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from reftbench import methods, precision
from reftbench.data import collate_classification, collate_train, encode_example
from reftbench.errors import ConfigError
from reftbench.train import train

from conftest import method_cfg, tiny_bert, tiny_llama


def trainer_cfg(**kw):
    base = dict(epochs=None, max_steps=4, lr=None, batch_size=6, grad_accum=1, weight_decay=0.0, warmup_ratio=0.0,
                max_length=64, max_grad_norm=1.0, precision="auto", base_dropout=True, checkpoints=False)
    base.update(kw)
    return OmegaConf.create(base)


def sums(tok):
    return [encode_example(tok, f"{a}+{b}=", f" {a + b}", 64) for a in range(4) for b in range(3)]


# (method, options, lr): DoRA at its paper lr 2e-4 and full finetuning at 2e-5 are the cases whose
# steps fell below half a bf16 ulp and rounded away when they trained their bf16 tensors directly.
DECODER = [("loreft", {}, 4e-3), ("direft", {}, 4e-3), ("noreft", {}, 4e-3), ("lora", {"rank": 4}, 3e-4),
           ("dora", {"rank": 4}, 2e-4), ("red", {}, 4e-3), ("full", {}, 2e-5)]


def build(name, model, **kw):
    cfg = method_cfg(name=name, **kw) if name in ("loreft", "noreft", "direft") else dict(name=name, **kw)
    return methods.build(cfg, model)


@pytest.mark.parametrize("name,kw,lr", DECODER, ids=[d[0] for d in DECODER])
def test_bf16_mixed_trains_fp32_parameters_and_moves_every_tensor(name, kw, lr):
    llama = tiny_llama(dtype="bfloat16", layers=2)
    model, tok = llama.model, llama.tokenizer
    m = build(name, model, lr=lr, **kw)
    if name == "lora":  # B starts at 0, so A gets no gradient on the first steps: start from a moved B
        with torch.no_grad():
            for p in m.trainable_parameters():
                p.add_(1e-2)
    before = {id(p): p.detach().float().clone() for p in m.trainable_parameters()}
    stats = train(model, m, sums(tok), trainer_cfg(), lambda b: collate_train(b, tok.pad_token_id))
    assert stats["precision"] == "bf16-mixed" and stats["lr"] == lr
    assert stats["param_dtypes"] == {"method": {"float32": len(before)}}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen)  # the base keeps its memory-saving dtype
    for p in m.trainable_parameters():
        assert p.dtype == torch.float32
        assert not torch.equal(p.detach(), before[id(p)]), f"{name}: a {tuple(p.shape)} tensor never changed"


def test_bitfit_on_a_bf16_encoder():
    model = tiny_bert().to(torch.bfloat16)
    m = methods.build({"name": "bitfit", "lr": 1e-3}, model)
    head = list(model.classifier.parameters())
    g = torch.Generator().manual_seed(0)
    exs = [{"input_ids": torch.randint(5, 100, (int(n),), generator=g).tolist(), "label": int(n) % 2,
            "prompt_length": int(n)} for n in torch.randint(4, 12, (12,), generator=g)]

    def loss(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"])

    before = {id(p): p.detach().float().clone() for p in m.trainable_parameters() + head}
    stats = train(model, m, exs, trainer_cfg(), lambda b: collate_classification(b, 0), loss_fn=loss,
                  extra_params=head)
    assert stats["precision"] == "bf16-mixed"
    assert set(stats["param_dtypes"]) == {"method", "head"} and set(stats["param_dtypes"]["method"]) == {"float32"}
    for p in m.trainable_parameters() + head:
        assert p.dtype == torch.float32 and not torch.equal(p.detach(), before[id(p)])


def test_bf16_mixed_loss_follows_fp32():
    """The same LoReFT run on fp32 weights (fp32) and on the same weights rounded to bf16 (bf16-mixed).
    Tolerance 0.01 nats on a loss of ~4.6: bf16 keeps 8 significant bits, so rounding the frozen weights
    and every matmul's inputs moves the loss by a few 1e-4 (measured: 2.8e-4 at most over these 8
    steps), while each step lowers it by 0.015 to 0.07. 0.01 is ~35x the rounding noise and below one
    step's progress, so a run whose steps round away or lag (a bf16 master weight or optimiser state)
    leaves the band."""
    curves = {}
    for dtype in ("float32", "bfloat16"):
        llama = tiny_llama(layers=2)
        model, tok = llama.model, llama.tokenizer
        model.to(getattr(torch, dtype))
        torch.manual_seed(0)
        m = build("loreft", model, rank=2)
        exs = sums(tok)
        batch = collate_train(exs, tok.pad_token_id)
        losses = []

        def loss_fn(model, b, _losses=losses):
            from reftbench.train import answer_loss
            out = answer_loss(model, b)
            _losses.append(out.item())
            return out
        stats = train(model, m, exs, trainer_cfg(max_steps=8, batch_size=12, lr=2e-2),
                      lambda b: collate_train(b, tok.pad_token_id), loss_fn=loss_fn)
        assert stats["precision"] == ("fp32" if dtype == "float32" else "bf16-mixed")
        curves[dtype] = torch.tensor(losses)
    fp32, bf16 = curves["float32"], curves["bfloat16"]
    assert (fp32 - bf16).abs().max() < 0.01, (fp32, bf16)
    assert fp32[0] - fp32[-1] > 0.25 and bf16[0] - bf16[-1] > 0.25


@pytest.mark.parametrize("policy,dtype,expected", [
    ("auto", "bfloat16", "bf16-mixed"), ("auto", "float32", "fp32"), ("auto", "float64", "fp32"),
    ("bf16-mixed", "float32", "bf16-mixed"), ("fp16-mixed", "float16", "fp16-mixed"),
])
def test_policy_resolution(policy, dtype, expected):
    assert precision.resolve(policy, dtype) == expected


@pytest.mark.parametrize("policy,dtype,match", [
    ("auto", "float16", "model.dtype=float16"), ("bf16-mixed", "float16", "fp16-mixed"),
    ("fp32", "bfloat16", "trainer.precision=fp32"), ("bf16", "float32", "trainer.precision='bf16' is unknown"),
])
def test_bad_policies_are_one_line(policy, dtype, match):
    with pytest.raises(ConfigError, match=match) as e:
        precision.resolve(policy, dtype)
    assert "\n" not in str(e.value)


def test_a_float16_model_is_refused_before_loading(tmp_path):
    from hydra import compose, initialize_config_dir
    from reftbench.run import run
    from conftest import ROOT
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny-random-llama", "model.dtype=float16"])
    with pytest.raises(ConfigError, match="fp16-mixed"):
        run(cfg, tmp_path)
    assert not any(tmp_path.iterdir())


def test_fp16_mixed_on_the_cpu_is_one_line():
    from reftbench.train import make_accelerator
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(ConfigError, match="fp16-mixed needs a GPU"):
        make_accelerator("fp16-mixed", "auto")


def test_an_untrained_method_scores_as_the_frozen_model_under_bf16_mixed(tmp_path):
    """intervention=none changes nothing, so its trained score and held-out loss must equal the frozen
    ones: both are computed under the same autocast (bf16 matmuls on fp32 weights here)."""
    from hydra import compose, initialize_config_dir
    from reftbench.run import run
    from conftest import ROOT
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=tiny-random-llama", "intervention=none", "trainer.precision=bf16-mixed", "trainer.max_steps=1",
            "task.train_limit=16", "++task.heldout=4", "task.eval_limit=4", "task.max_new_tokens=4",
            "trainer.batch_size=4", "eval_batch_size=4", "save_intervention=false", "cache=false", "device=cpu"])
    record = run(cfg, tmp_path)
    assert record["train"]["precision"] == "bf16-mixed"
    frozen, trained = record["metrics"]["frozen"], record["metrics"]["trained"]
    assert "heldout_loss" in frozen and "score" in frozen
    assert trained == frozen
