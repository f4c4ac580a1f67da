"""Sweeps through Hydra's launcher plugins: joblib and submitit (local) run the jobs in other
processes; SLURM is checked up to the sbatch script it would submit (no cluster here)."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny-random-llama", "trainer.max_steps=2", "task.train_limit=8", "task.eval_limit=2",
        "task.max_new_tokens=4", "trainer.batch_size=4", "eval_batch_size=4", "save_intervention=false"]


def reftbench(*args, cwd, path_prefix=None):
    exe = Path(sys.executable).with_name("reftbench")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def results(sweep: Path) -> dict:
    return {p.parent.name: (json.loads(p.read_text()), p.stat().st_mtime_ns) for p in sweep.glob("*/result.json")}


def test_joblib_runs_jobs_in_parallel_processes_and_a_second_launch_skips_them(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "intervention.rank=2,4,0",
            f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"]
    res = reftbench(*args, cwd=tmp_path)
    # rank 0 fails in a worker process; the main process learns it from that job's failed.json
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("reftbench: error: 1 job(s) of the sweep could not run: intervention.rank=0 (")
    (failed,) = sweep.glob("*/failed.json")
    assert "intervention.rank=0 is out of range" in json.loads(failed.read_text())["reason"]
    first = results(sweep)
    assert sorted(r["config"]["intervention"]["rank"] for r, _ in first.values()) == [2, 4]
    # two jobs ran at once, in two processes: the frozen model was still scored once between them
    assert sorted(r["cache"]["frozen_score"]["from"] for r, _ in first.values()) == ["cache", "computed"]

    res = reftbench(*args[:-3], "intervention.rank=2,4", *args[-2:], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("skipped, already done") == 2
    assert {k: m for k, (_, m) in results(sweep).items()} == {k: m for k, (_, m) in first.items()}


def test_submitit_local_runs_each_job_in_its_own_process_and_a_second_launch_skips_them(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", *TINY, "hydra/launcher=submitit_local", "seed=1,2", "eval_frozen=false",
            f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"]
    res = reftbench(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "ConfigStore schema" not in res.stderr
    first = results(sweep)
    assert sorted(r["seed"] for r, _ in first.values()) == [1, 2]
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2 and all("result: " in p.read_text() for p in logs)

    res = reftbench(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert sum("skipped, already done" in p.read_text() for p in logs) == 2
    assert {k: m for k, (_, m) in results(sweep).items()} == {k: m for k, (_, m) in first.items()}


def fake_sbatch(tmp_path) -> Path:
    """An `sbatch` that keeps the script it was given and refuses it: nothing reaches a cluster."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", f'cp "$1" {tmp_path}/submitted.sh\necho "fake sbatch: refused" >&2\n'),
                       ("srun", "")):  # submitit looks for srun to tell it is on a cluster
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\n{body}exit 1\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_the_slurm_launcher_asks_for_one_gpu_per_job_and_takes_cluster_settings(tmp_path):
    bin_dir = fake_sbatch(tmp_path)
    res = reftbench("-m", *TINY, "seed=1,2", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                    "hydra.launcher.account=myproj", "hydra.launcher.timeout_min=90", "hydra.launcher.cpus_per_task=4",
                    "hydra.launcher.mem_gb=32", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path,
                    path_prefix=bin_dir)
    assert res.returncode != 0  # the fake sbatch refused it
    script = (tmp_path / "submitted.sh").read_text()
    for line in ("#SBATCH --gpus-per-node=1", "#SBATCH --partition=gpu", "#SBATCH --account=myproj",
                 "#SBATCH --time=90", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=32GB", "#SBATCH --array=0-1%2", "#SBATCH --job-name=reftbench",
                 "#SBATCH --signal=USR2@120", "#SBATCH --ntasks-per-node=1", "#SBATCH --nodes=1"):
        assert line in script.splitlines(), line
    assert not list((tmp_path / "sweep").glob("*/result.json"))


def test_a_dry_run_through_the_slurm_launcher_plans_here_and_submits_nothing(tmp_path):
    bin_dir = fake_sbatch(tmp_path)
    res = reftbench("-m", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "dry_run=true",
                    "model=llama-7b", "intervention.rank=8", "seed=42,43", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                    cwd=tmp_path, path_prefix=bin_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    plans = [line for line in res.stdout.splitlines() if line.startswith("dry run:")]
    assert plans == [f"dry run: loreft on chain-sum (llama-7b, seed {s}): 2,097,408 trainable of 6,738,415,616 "
                     "base params (0.031%)" for s in (42, 43)]
    assert "planning here, not through the launcher" in res.stderr
    assert not (tmp_path / "submitted.sh").exists() and not (tmp_path / "sweep" / ".submitit").exists()


def test_make_sends_a_table_to_a_launcher_and_reports_once(tmp_path):
    for launcher, name in (("slurm", "submitit_slurm"), ("local", "submitit_local"), ("joblib", "joblib")):
        res = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "reproduce-table2",
                              f"LAUNCHER={launcher}", "ARGS=device=cuda hydra.launcher.partition=gpu"], cwd=ROOT,
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        (cmd,) = [line for line in res.stdout.splitlines() if "reftbench -m" in line]
        assert f"hydra/launcher={name} device=cuda hydra.launcher.partition=gpu" in cmd
        assert cmd.count("reftbench-report reproductions/table2") == 1
    res = subprocess.run(["make", "-n", "-o", ".venv/.installed", "reproduce-table2", "LAUNCHER=pbs"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode != 0 and "LAUNCHER=pbs is unknown" in res.stderr
