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
    # an optional group would skip an unknown experiment silently and run the defaults instead
    res = reftbench(*TINY, "experiment=table1_loreft_llama8b", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert res.stderr.startswith("reftbench: error: experiment=table1_loreft_llama8b is unknown: choose one of")
    assert not list(tmp_path.rglob("result.json"))


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


def test_a_killed_multirun_resumes_without_redoing_finished_runs(tmp_path):
    import signal
    import time
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "seed=1,2,3,4", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.override_dirname}"]
    exe = Path(sys.executable).with_name("reftbench")
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen([str(exe), *args], cwd=tmp_path, stdout=log, stderr=log, start_new_session=True,
                                env=dict(os.environ, HF_HUB_OFFLINE="1"))
        deadline = time.time() + 240
        while not list(sweep.glob("*/result.json")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # as a lost node or a Ctrl-C'd terminal would
        proc.wait()
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sweep.glob("*/result.json")}
    assert 1 <= len(before) < 4, (tmp_path / "log").read_text()[-2000:]

    res = reftbench(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    after = sorted(sweep.glob("*/result.json"))
    assert sorted(json.loads(p.read_text())["seed"] for p in after) == [1, 2, 3, 4]
    for p, (content, mtime) in before.items():  # finished runs were not redone
        assert p.read_bytes() == content and p.stat().st_mtime_ns == mtime
    assert res.stdout.count("skipped, already done") == len(before)
    assert res.stdout.count("result: ") == 4 - len(before)


def test_resume_reruns_a_changed_config_or_when_told(tmp_path):
    from hydra import compose, initialize_config_dir

    from reftbench.run import finished
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=TINY)
        changed = compose("config", overrides=TINY + ["trainer.lr=1e-3"])
        off = compose("config", overrides=TINY + ["resume=false"])
    from omegaconf import OmegaConf
    (tmp_path / "result.json").write_text(json.dumps({"config": OmegaConf.to_container(cfg, resolve=True)}))
    assert finished(cfg, tmp_path) is not None
    assert finished(changed, tmp_path) is None
    off_record = {"config": OmegaConf.to_container(off, resolve=True)}
    (tmp_path / "result.json").write_text(json.dumps(off_record))
    assert finished(off, tmp_path) is None
    (tmp_path / "result.json").write_text("{not json")
    assert finished(cfg, tmp_path) is None


def test_a_glue_row_with_a_task_it_has_no_settings_for_is_one_line(tmp_path):
    res = reftbench("experiment=table4_loreft_robertabase", "task=boolq", "dry_run=true", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "reftbench: error: this experiment has per-task settings (per_task) and none for task=boolq: "
        "choose a task it lists"]


def test_dry_run_of_a_table_sweep_plans_every_job_without_weights(tmp_path):
    res = reftbench("-m", "experiment=glob(table2_*)", "seed=42,43", "dry_run=true", f"hydra.sweep.dir={tmp_path / 's'}",
                    cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    plans = [line for line in res.stdout.splitlines() if line.startswith("dry run:")]
    assert len(plans) == 4 * 2  # four rows x two seeds
    assert sum("loreft on math (llama-7b, seed 4" in p and "[table2, row loreft]: 2,097,408 trainable" in p
               and "(0.031%)" in p for p in plans) == 2
    assert sum("lora on math (llama-13b" in p and "87,818,240 trainable" in p for p in plans) == 2
    assert not list(tmp_path.rglob("result.json"))


@pytest.mark.parametrize("target,sweep", [("reproduce-table1", "seed=42,43,44"), ("reproduce-table2", "seed=42,43,44"),
                                          ("reproduce-table3", "seed=42,43,44"),
                                          ("reproduce-table4", "task=mnli,sst2,mrpc,cola,qnli,qqp,rte,stsb seed=42,43,44,45,46")])
def test_reproduce_targets_sweep_a_table_into_a_fixed_folder_and_write_it(target, sweep):
    """Resuming needs each job's folder to be the same on every call: a fixed sweep dir and a subdir
    named by the job's overrides (not by its number or the time)."""
    res = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", target], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    table = target.split("-")[1]
    (cmd,) = [line for line in res.stdout.splitlines() if "reftbench -m" in line]
    assert f"reftbench -m 'experiment=glob({table}_*)' {sweep} hydra.sweep.dir=reproductions/{table} " in cmd
    assert "'hydra.sweep.subdir=${hydra.job.override_dirname}'" in cmd
    assert f"reftbench-report reproductions/{table} --table {table} --out-dir results/{table}" in cmd


def test_a_table_row_run_through_the_cli_reports_each_test_set_and_their_average(tmp_path):
    """The real record of a several-test-set run (commonsense) -> the report's per-set cells and the
    average; on a stand-in model the run is a variant, not set beside the paper."""
    from reftbench import report
    fixtures = ROOT / "tests" / "fixtures" / "llm-adapters"
    res = reftbench("experiment=table1_loreft_llama7b", "model=tiny-random-llama", f"task.data_dir={fixtures}",
                    "trainer.max_steps=2", "trainer.batch_size=4", "task.eval_limit=2", "task.max_new_tokens=4",
                    "intervention.rank=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    rec = json.loads((tmp_path / "run" / "result.json").read_text())
    assert rec["config"]["table"] == "table1" and rec["config"]["row"] == "loreft"
    rows = report.tables([rec])["table1"]
    mine = {r["task"]: r for r in rows if r["model"] == "tiny-random-llama"}
    sets = list(rec["metrics"]["trained"]["by_task"])
    assert sorted(mine) == sorted(sets + ["avg"]) and len(sets) == 8
    for t in sets:
        assert mine[t]["mean"] == pytest.approx(100 * rec["metrics"]["trained"]["by_task"][t]["accuracy"])
        assert mine[t]["paper"] is None  # another model: no paper cell
    assert mine["avg"]["mean"] == pytest.approx(sum(mine[t]["mean"] for t in sets) / 8)
    assert all(r["mean"] is None for r in rows if r["model"] == "llama-7b")  # the paper's rows: gaps


def test_online_is_the_default_and_offline_an_unloadable_hub_model_is_one_line(tmp_path, monkeypatch):
    """The CLI leaves HF_HUB_OFFLINE to the user (hub ids and data URLs work where there is a
    network); with no hub (HF_HUB_OFFLINE=1 here, no network on this machine) a hub model is one line."""
    from reftbench import cli
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(sys, "argv", ["reftbench", "dry_run=true"])
    monkeypatch.setattr(cli, "_app", lambda: None)
    cli.main()
    assert "HF_HUB_OFFLINE" not in os.environ
    res = reftbench(*TINY, "model=llama-7b", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("reftbench: error: could not load model 'huggyllama/llama-7b'")
    assert "model.path=" in res.stderr and not (tmp_path / "run" / "result.json").exists()
