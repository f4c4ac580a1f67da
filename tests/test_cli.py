"""The real command line, end to end, on a tiny random model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reftbench.run import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny-random-llama", "trainer.max_steps=4", "task.train_limit=24", "task.eval_limit=6",
        "trainer.batch_size=4", "eval_batch_size=8"]


def reftbench(*args, cwd):
    exe = Path(sys.executable).with_name("reftbench")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_end_to_end_writes_result_json(tmp_path):
    out = tmp_path / "run"
    res = reftbench(*TINY, "intervention.rank=2", "intervention.layers=0;1;2;3", f"hydra.run.dir={out}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads((out / "result.json").read_text())
    assert rec["method"] == "loreft" and rec["task"] == "chain-sum" and rec["model"] == "tiny-random-llama"
    assert set(rec["metrics"]) == {"frozen", "trained"} and rec["metrics"]["trained"]["n"] == 6
    d, r, layers = 64, 2, 4
    assert rec["params"]["trainable"] == layers * (2 * r * d + r)
    assert 0 < rec["params"]["percent"] < 100
    assert rec["config"]["intervention"]["rank"] == 2
    assert "intervention.rank=2" in rec["overrides"]
    assert rec["train"]["steps"] == 4
    assert rec["versions"]["torch"].startswith("2.") and "wall_seconds" in rec and "memory" in rec
    assert (out / "intervention" / "weights.safetensors").exists()
    assert "loreft on chain-sum" in res.stdout


@pytest.mark.parametrize("override,needle", [
    ("intervention.rank=0", "intervention.rank=0"),
    ("intervention.rank=100000", "out of range"),
    ("intervention.layers=7", "layer 7"),
    ("intervention.positions=f7l7", "malformed"),
    ("trainer.lr=-1", "trainer.lr"),
])
def test_bad_values_end_in_one_line(tmp_path, override, needle):
    res = reftbench(*TINY, override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if l.startswith("reftbench: error:")]
    assert len(lines) == 1 and needle in lines[0]
    assert not (tmp_path / "run" / "result.json").exists()


def test_unknown_option_fails_without_traceback(tmp_path):
    res = reftbench(*TINY, "intervention.rnak=3", cwd=tmp_path)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip() == ("reftbench: error: intervention.rnak is not an option "
                                  "(check the spelling; to add a new key use +intervention.rnak=...)")
    res = reftbench(*TINY, "intervention=nope", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().startswith("reftbench: error: intervention=nope is unknown")


def test_same_seed_same_numbers(tmp_path):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=TINY + ["trainer.max_steps=6"])
    a = run(cfg, tmp_path / "a")
    b = run(cfg, tmp_path / "b")
    assert a["metrics"] == b["metrics"] and a["train"]["final_loss"] == b["train"]["final_loss"]
    assert a["samples"] == b["samples"]


def test_dry_run_loads_nothing_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    res = reftbench("dry_run=true", "model=llama-7b", "intervention.rank=8", f"hydra.run.dir={out}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "dry run: loreft on chain-sum (llama-7b, seed 42): 2,097,408 trainable of 6,738,415,616 base params (0.031%)" in res.stdout
    assert not (out / "result.json").exists()


def test_instruction_task_writes_alpaca_eval_file_and_heldout_loss(tmp_path):
    from hydra import compose, initialize_config_dir
    fixtures = ROOT / "tests" / "fixtures" / "llm-adapters"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny-random-llama", "task=alpaca", f"task.data_dir={fixtures}",
                                           "task.heldout=1", "task.max_new_tokens=4", "trainer.max_steps=2",
                                           "trainer.batch_size=2", "eval_frozen=false"])
    rec = run(cfg, tmp_path)
    answers = json.loads((tmp_path / "alpaca_eval_outputs.json").read_text())
    assert rec["metrics"]["trained"]["n"] == len(answers) > 0
    assert set(answers[0]) >= {"instruction", "output", "generator"}
    assert answers[0]["generator"] == "tiny-random-llama-loreft-seed42"
    assert rec["metrics"]["frozen"]["heldout_loss"] > 0 and rec["metrics"]["trained"]["heldout_loss"] > 0


def test_multirun_goes_past_a_job_that_cannot_run_and_exits_nonzero(tmp_path):
    res = reftbench("-m", *TINY, "trainer.max_steps=1", "intervention=bitfit,loreft", f"hydra.sweep.dir={tmp_path}",
                    cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "bitfit trains only bias terms" in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("reftbench: error: 1 job(s) of the sweep could not run:") and "intervention=bitfit" in last
    assert len(list(tmp_path.glob("*/result.json"))) == 1  # loreft still ran
