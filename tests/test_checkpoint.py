"""Kill a run with SIGKILL, start it again in the same folder: it resumes from its last checkpoint and
ends with the same weights and metrics as a run never interrupted."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from reftbench import checkpoint
from reftbench.errors import ConfigError
from reftbench.run import run

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT / "tests" / "fixtures" / "glue" / "SST-2"
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

# GLUE-style, with everything a resume must restore: the base model's dropout (RNG states), LoReFT's own
# dropout, grad accumulation 2 over 4 micro-batches an epoch (position in the data), a warm-up and decay
# (scheduler), AdamW (optimiser state), model selection (its best state so far) and the head.
OVERRIDES = ["model=tiny-random-bert", "task=sst2", f"task.data_dir={GLUE}", "trainer.epochs=3",
             "trainer.batch_size=1", "trainer.grad_accum=2", "trainer.lr=1e-2", "trainer.warmup_ratio=0.2",
             "trainer.save_every=1", "intervention.positions=f1", "intervention.rank=2", "intervention.dropout=0.1",
             "eval_frozen=false", "trainer.keep_checkpoints=true"]


def cfg(*extra):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=OVERRIDES + list(extra))


def killed(out_dir, kill_at, when):
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "killed_run.py"), str(out_dir), str(kill_at),
                          when, *OVERRIDES], env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert not (out_dir / "result.json").exists()


def weights(out_dir):
    """The saved weights (model selection's best epoch) and the last step's trained tensors (the kept
    final checkpoint), which the steps after the resume produced whatever epoch selection picked."""
    last = checkpoint.latest(out_dir / "checkpoints")
    return {**load_file(str(out_dir / "intervention" / "weights.safetensors")),
            **load_file(str(out_dir / "intervention" / "head.safetensors")),
            **{f"last.{k}": v for k, v in load_file(str(last / "model.safetensors")).items()}}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    return run(cfg(), out), weights(out)


@pytest.mark.parametrize("kill_at,when,resumed_from", [(3, "after", 3), (4, "during", 3)])
def test_killed_and_resumed_run_ends_as_an_uninterrupted_one(tmp_path, uninterrupted, kill_at, when, resumed_from):
    """Step 3 is mid-epoch (epoch 2's first step); a kill while step 4's checkpoint (the end of epoch 2)
    is written leaves it incomplete, so the run resumes from step 3's."""
    record, expected = uninterrupted
    assert record["train"]["steps"] == 6 and record["train"]["resumed_from_step"] is None
    killed(tmp_path, kill_at, when)
    assert checkpoint.latest(tmp_path / "checkpoints").name == f"step-{resumed_from:09d}"
    if when == "during":
        assert (tmp_path / "checkpoints" / "incomplete").is_dir()  # half-written, and not taken for a checkpoint
    again = run(cfg(), tmp_path)  # the same command in the same folder
    assert again["train"]["resumed_from_step"] == resumed_from
    assert again["metrics"] == record["metrics"]
    assert (again["train"]["best_epoch"], again["train"]["selection_score"]) == \
        (record["train"]["best_epoch"], record["train"]["selection_score"])
    assert again["train"]["final_loss"] == pytest.approx(record["train"]["final_loss"], abs=1e-6)
    got = weights(tmp_path)
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.allclose(got[k], expected[k], atol=1e-6), k
    assert any(k.startswith("last.") for k in got) and checkpoint.latest(tmp_path / "checkpoints").name.endswith("6")
    assert json.loads((tmp_path / "result.json").read_text())["train"]["resumed_from_step"] == resumed_from


def test_a_resubmitted_run_resumes_despite_harmless_changes_and_refuses_a_training_change(tmp_path):
    steps = ["trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_checkpoints=true"]
    first = run(cfg(*steps), tmp_path)
    assert first["train"]["resumed_from_step"] is None
    assert checkpoint.latest(tmp_path / "checkpoints").name == "step-000000004"
    saved = load_file(str(tmp_path / "intervention" / "weights.safetensors"))
    (tmp_path / "result.json").unlink()
    # what does not change training: evaluation batch, logging, where the cache lives, checkpoint cadence
    again = run(cfg(*steps, "eval_batch_size=3", "wandb.project=other", f"cache_dir={tmp_path / 'cache'}",
                    "trainer.save_every=3"), tmp_path)
    assert again["train"]["resumed_from_step"] == 4 and again["train"]["steps"] == 4
    assert json.loads((tmp_path / "result.json").read_text())["train"]["resumed_from_step"] == 4
    now = load_file(str(tmp_path / "intervention" / "weights.safetensors"))
    assert now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in now)

    (tmp_path / "result.json").unlink()
    with pytest.raises(ConfigError) as e:
        run(cfg(*steps, "trainer.lr=0.02"), tmp_path)
    assert "trainer.lr" in str(e.value) and "\n" not in str(e.value) and "eval_batch_size" not in str(e.value)
    assert checkpoint.latest(tmp_path / "checkpoints").name == "step-000000004"  # refused, not deleted
    no_resume = run(cfg("trainer.max_steps=3", "resume=false", "trainer.keep_checkpoints=false"), tmp_path)  # told to: starts afresh
    assert no_resume["train"]["resumed_from_step"] is None
    assert not (tmp_path / "checkpoints").exists()  # removed once the run finished


def test_fingerprint_covers_training_only():
    base = checkpoint.fingerprint(cfg())
    for harmless in ("eval_batch_size=3", "device=cpu", "wandb.enabled=true", "cache=false", "eval_frozen=true",
                     "trainer.save_every=5", "trainer.keep_checkpoints=false", "model.path=/elsewhere"):
        assert checkpoint.fingerprint(cfg(harmless)) == base, harmless
    for key, override in [("trainer.lr", "trainer.lr=0.5"), ("seed", "seed=7"), ("intervention.rank", "intervention.rank=3"),
                          ("trainer.precision", "trainer.precision=bf16-mixed"), ("task.train_limit", "task.train_limit=2")]:
        assert checkpoint.differing_keys(base, checkpoint.fingerprint(cfg(override))) == [key]
    from omegaconf import OmegaConf  # a checkpoint of an earlier version holds the whole config: reduced the same way
    assert checkpoint.fingerprint(OmegaConf.to_container(cfg("eval_batch_size=3"), resolve=True)) == base


def test_a_checkpoint_missing_a_trained_tensor_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file
    run(cfg("trainer.max_steps=2", "trainer.save_every=1"), tmp_path)
    last = checkpoint.latest(tmp_path / "checkpoints")
    tensors = load_file(str(last / "model.safetensors"))
    # the checkpoint holds the trained tensors only: no frozen weight, no constant d x d rotation base
    assert tensors and not any(k.endswith(".base") for k in tensors)
    others = [k for k in tensors if not k.startswith("method.")]
    assert others and all("classifier" in k or "pooler" in k for k in others), others  # the head trains too
    dropped = next(k for k in tensors if k.endswith("rotation.X"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(last / "model.safetensors"))
    (tmp_path / "result.json").unlink()
    with pytest.raises(ConfigError, match=f"lacks {dropped}"):
        run(cfg("trainer.max_steps=2", "trainer.save_every=1"), tmp_path)


def test_no_checkpoints_when_switched_off(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(checkpoint.Saver, "save", lambda self, state: saved.append(self.root))
    run(cfg("trainer.checkpoints=false", "trainer.max_steps=2"), tmp_path)
    assert saved and set(saved) == {None}
