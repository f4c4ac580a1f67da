"""The loop's rules: one learning rate, epoch-bounded gradient accumulation, the base model's dropout,
the device default, and weight decay through the method interface."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import get_linear_schedule_with_warmup

from reftbench import methods
from reftbench.data import collate_train, encode_example
from reftbench.errors import ConfigError
from reftbench.train import Step, effective_lr, make_accelerator, train

from conftest import ROOT, method_cfg, tiny_llama

CONF = ROOT / "conf"
GLUE = ROOT / "tests" / "fixtures" / "glue" / "SST-2"


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def trainer_cfg(**kw):
    base = dict(epochs=1, max_steps=None, lr=1e-3, batch_size=2, grad_accum=1, weight_decay=0.0, warmup_ratio=0.0,
                max_length=64, max_grad_norm=1.0, precision="auto", base_dropout=True, checkpoints=False)
    base.update(kw)
    return OmegaConf.create(base)


def examples(tok, n):
    return [encode_example(tok, f"{i}+{i}=", f" {2 * i}", 64) for i in range(n)]


# ---- one learning rate ----

METHODS = ["loreft", "direft", "noreft", "red", "lora", "dora", "full", "bitfit", "none"]


@pytest.mark.parametrize("name", METHODS)
def test_trainer_lr_wins_for_every_method_and_null_means_the_methods_own(name):
    model = "tiny-random-bert" if name == "bitfit" else "tiny-random-llama"
    swept = compose_cfg(f"intervention={name}", f"model={model}", "trainer.lr=1.5e-3")
    assert effective_lr(swept.trainer, swept.intervention) == 1.5e-3
    own = compose_cfg(f"intervention={name}", f"model={model}")
    assert own.trainer.lr is None
    assert effective_lr(own.trainer, own.intervention) == own.intervention.lr > 0


def test_no_learning_rate_at_all_is_one_line():
    cfg = compose_cfg("intervention.lr=null")
    with pytest.raises(ConfigError, match="no learning rate: set trainer.lr"):
        effective_lr(cfg.trainer, cfg.intervention)


def test_every_preset_trains_at_the_lr_it_states():
    """A preset that names a method's lr (intervention.lr) must train at it: the Table 3 full row said
    2e-5 and recorded trainer.lr 9e-4; now the row's trainer.lr is the one that trains."""
    stated = {}
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        raw = OmegaConf.load(path)
        lr = OmegaConf.select(raw, "intervention.lr")
        cfg = compose_cfg(f"experiment={path.stem}")
        if path.stem.startswith("table4_loreft"):
            cfg = compose_cfg(f"experiment={path.stem}", "task=rte")
        got = effective_lr(cfg.trainer, cfg.intervention)
        if lr is not None:
            assert got == lr, path.name
        stated[path.stem] = got
    assert stated["table3_full_llama2-7b"] == 2e-5 and stated["table3_lora_llama2-7b"] == 3e-4
    assert stated["table3_loreft_llama2-7b"] == 9e-4 and stated["table4_full_robertabase"] == 2e-5


def test_mini_presets_keep_each_methods_lr():
    lrs = {name: effective_lr(c.trainer, c.intervention) for name in ("loreft", "lora", "dora", "full", "red", "none")
           for c in [compose_cfg("experiment=mini_sst2", f"intervention={name}")]}
    assert lrs == {"loreft": 2e-3, "lora": 3e-4, "dora": 2e-4, "full": 2e-5, "red": 2e-3, "none": 2e-3}


def test_the_lr_is_the_one_the_optimiser_uses():
    ends, seen = {}, []
    for lr in (1e-3, 1e-2):
        llama = tiny_llama(layers=2)
        tok = llama.tokenizer
        torch.manual_seed(0)
        m = methods.build(method_cfg(lr=5e-2), llama.model)  # the method's own lr loses to trainer.lr
        stats = train(llama.model, m, examples(tok, 4), trainer_cfg(lr=lr, max_steps=2),
                      lambda b: collate_train(b, tok.pad_token_id), log_fn=lambda d, s: seen.append(d["train/lr"]))
        assert stats["lr"] == lr
        ends[lr] = torch.cat([p.detach().flatten() for p in m.trainable_parameters()])
    assert seen == pytest.approx([5e-4, 0.0, 5e-3, 0.0])  # the schedule's lr after each step (linear to 0)
    assert not torch.allclose(ends[1e-3], ends[1e-2])


# ---- gradient accumulation never spans two epochs ----

def test_grad_accum_steps_at_each_epoch_end():
    llama = tiny_llama(layers=2)
    tok = llama.tokenizer
    m = methods.build(method_cfg(rank=2), llama.model)
    calls, at_step, lrs = [0], [], []

    def loss_fn(model, batch):
        from reftbench.train import answer_loss
        calls[0] += 1
        return answer_loss(model, batch)

    def log_fn(data, step):
        at_step.append(calls[0])
        lrs.append(data["train/lr"])

    epochs = []
    # 10 examples, batch 2: 5 micro-batches per epoch; grad_accum 2: steps of 2, 2 and 1 micro-batches
    stats = train(llama.model, m, examples(tok, 10), trainer_cfg(epochs=3, grad_accum=2, warmup_ratio=0.25, lr=1e-2),
                  lambda b: collate_train(b, tok.pad_token_id), loss_fn=loss_fn, log_fn=log_fn,
                  on_epoch_end=lambda e: epochs.append((e, calls[0])))
    assert stats["steps"] == stats["total_steps"] == 9 and stats["epochs"] == 3
    assert at_step == [2, 4, 5, 7, 9, 10, 12, 14, 15]
    assert epochs == [(1, 5), (2, 10), (3, 15)]  # selection always scores whole epochs
    assert stats["warmup_steps"] == 2  # int(0.25 * 9)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    sched = get_linear_schedule_with_warmup(opt, 2, 9)
    expected = []
    for _ in range(9):
        opt.step()
        sched.step()
        expected.append(sched.get_last_lr()[0])
    assert lrs == pytest.approx(expected)


def record_step_grads(monkeypatch) -> list:
    """The flattened gradient each AdamW step sees, in order (AdamW's own step then runs as usual)."""
    grads = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *a, **kw):
        grads.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]))
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    return grads


def test_a_short_last_group_is_the_mean_of_its_micro_batches(monkeypatch):
    """An epoch's last optimiser step averages the micro-batches it has (here 1 of grad_accum 2): its
    gradient is that batch's gradient, not half of it."""
    from reftbench.train import epoch_batches
    grads = record_step_grads(monkeypatch)
    last = epoch_batches(6, 2, 0, 0)[-1]
    for ga, keep in ((2, None), (1, last)):
        llama = tiny_llama(layers=2)
        tok = llama.tokenizer
        torch.manual_seed(0)
        m = methods.build(method_cfg(rank=2), llama.model)
        exs = examples(tok, 6)
        exs = [exs[i] for i in keep] if keep else exs
        # lr 1e-9: the first step leaves the weights as they were, so both runs see the same gradient
        train(llama.model, m, exs, trainer_cfg(grad_accum=ga, lr=1e-9, max_grad_norm=0.0),
              lambda b: collate_train(b, tok.pad_token_id))
    assert len(grads) == 3  # 6 examples, batch 2, grad_accum 2: steps of 2 and 1 micro-batches; then 1
    assert torch.allclose(grads[1], grads[2], atol=1e-6)


# ---- the base model's dropout (pyreft trains with the base model in train mode) ----

@pytest.mark.parametrize("base_dropout", [True, False])
def test_roberta_style_glue_run_with_base_dropout(tmp_path, monkeypatch, base_dropout):
    import reftbench.train as train_mod
    seen = {"step": [], "other": []}
    in_step = [False]
    real_forward, real_dropout = train_mod.Step.forward, torch.nn.Dropout.forward

    def step_forward(self, batch):
        in_step[0] = True
        try:
            return real_forward(self, batch)
        finally:
            in_step[0] = False

    def dropout_forward(self, x):
        if self.p > 0:  # the base model's and head's (0.1); the intervention's own dropout is 0 here
            seen["step" if in_step[0] else "other"].append(self.training)
        return real_dropout(self, x)

    monkeypatch.setattr(train_mod.Step, "forward", step_forward)
    monkeypatch.setattr(torch.nn.Dropout, "forward", dropout_forward)
    from reftbench.run import run
    cfg = compose_cfg("model=tiny-random-bert", "task=sst2", f"task.data_dir={GLUE}", "trainer.epochs=2",
                      "trainer.batch_size=4", "trainer.lr=1e-2", "intervention.positions=f1", "intervention.rank=2",
                      f"trainer.base_dropout={base_dropout}")
    rec = run(cfg, tmp_path)
    assert seen["step"] and seen["other"]  # dropout modules ran in training and in evaluation
    assert set(seen["step"]) == {base_dropout}  # the base model's (and the head's) dropout during the step
    assert set(seen["other"]) == {False}  # selection and test scoring in eval mode
    assert rec["train"]["epochs"] == 2 and rec["train"]["lr"] == 1e-2
    assert rec["train"]["precision"] == "fp32"
    assert rec["train"]["param_dtypes"] == {"method": {"float32": 6}, "head": {"float32": 4}}
    assert rec["train"]["weight_decay"] == {"method": 0.0, "head": 0.0}


# ---- device ----

def test_device_defaults_to_auto():
    cfg = compose_cfg()
    assert cfg.device == "auto"
    acc = make_accelerator("fp32", "auto")
    assert acc.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            make_accelerator("fp32", "cuda")


# ---- weight decay follows pyreft: never on ReFT's interventions, through MethodConfig.decay ----

@pytest.mark.parametrize("name,decayed", [("loreft", False), ("direft", False), ("noreft", False), ("lora", True),
                                          ("red", True)])
def test_weight_decay_through_the_method_interface(name, decayed):
    cfg = compose_cfg(f"intervention={name}", "model=tiny-random-llama")
    assert cfg.intervention.get("decay", True) is decayed  # absent: the MethodConfig default (decayed)
    llama = tiny_llama(layers=2)
    tok = llama.tokenizer
    options = OmegaConf.to_container(cfg.intervention)
    if name in ("loreft", "direft", "noreft"):
        options.update(positions="f2+l2", rank=2)
    if name == "lora":
        options.update(rank=2)
    m = methods.build(options, llama.model)
    before = [p.detach().clone() for p in m.trainable_parameters()]

    def no_gradient(model, batch):  # only the decay moves a weight
        from reftbench.train import answer_loss
        return 0.0 * answer_loss(model, batch)

    stats = train(llama.model, m, examples(tok, 4), trainer_cfg(lr=1e-2, weight_decay=0.5, max_steps=2),
                  lambda b: collate_train(b, tok.pad_token_id), loss_fn=no_gradient)
    assert stats["weight_decay"]["method"] == (0.5 if decayed else 0.0)
    moved = [not torch.equal(a, p.detach()) for a, p in zip(before, m.trainable_parameters())
             if a.abs().sum() > 0]  # a zero tensor (LoRA's B) decays to zero: no change to see
    assert all(moved) if decayed else not any(moved)


def test_step_wraps_model_and_method():
    llama = tiny_llama(layers=2)
    m = methods.build(method_cfg(rank=2), llama.model)
    s = Step(llama.model, m, None)
    trainable = {id(p) for p in s.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in m.trainable_parameters()}


# ---- gradient checkpointing, with interventions ----

def _first_step_grads(name, checkpointing, base_dropout, monkeypatch):
    """The gradient of the first optimiser step, and how often layer 0's attention ran (twice with
    checkpointing: its layer is recomputed during backward)."""
    grads = record_step_grads(monkeypatch)
    llama = tiny_llama(layers=2)
    tok = llama.tokenizer
    torch.manual_seed(0)
    m = methods.build(method_cfg(rank=2) if name == "loreft" else {"name": "lora", "rank": 2, "dropout": 0.0},
                      llama.model)
    if name == "lora":  # B = 0 would give A no gradient: move B first
        with torch.no_grad():
            for p in m.trainable_parameters():
                p.add_(1e-2)
    runs = [0]
    llama.model.model.layers[0].self_attn.register_forward_pre_hook(lambda *a: runs.__setitem__(0, runs[0] + 1))
    train(llama.model, m, examples(tok, 4), trainer_cfg(batch_size=4, max_steps=1, gradient_checkpointing=checkpointing,
                                                        base_dropout=base_dropout),
          lambda b: collate_train(b, tok.pad_token_id))
    monkeypatch.undo()
    assert not any(getattr(x, "gradient_checkpointing", False) for x in llama.model.modules())  # off again
    return grads[0], runs[0]


@pytest.mark.parametrize("name,base_dropout", [("loreft", True), ("loreft", False), ("lora", True)])
def test_gradient_checkpointing_gives_the_same_gradients(name, base_dropout, monkeypatch):
    """The loop keeps the method's context open across backward, so a layer recomputed during backward
    intervenes at the batch's positions again. (transformers 5.24 checkpoints a layer's forward and
    leaves the layer's own hooks, ReFT's block-output hook, outside the recompute; hooks inside a layer,
    RED's and LoRA's layers, are recomputed.)"""
    plain, once = _first_step_grads(name, False, base_dropout, monkeypatch)
    recomputed, twice = _first_step_grads(name, True, base_dropout, monkeypatch)
    assert (once, twice) == (1, 2)  # checkpointing really recomputed the layer (eval-mode base included)
    assert torch.allclose(plain, recomputed, atol=1e-6, rtol=1e-5)
