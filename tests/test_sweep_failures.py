"""A failed job in a sweep frees what it held before the next job starts, says why in its own folder,
and does not stop the sweep; the sweep's summary is read back from those folders."""
import json
import sys
import weakref

import torch

import reftbench.run as run_module
from reftbench import cli

TINY = ["model=tiny-random-llama", "trainer.max_steps=2", "task.train_limit=16", "task.eval_limit=4",
        "task.max_new_tokens=4", "trainer.batch_size=4", "eval_batch_size=8", "eval_frozen=false",
        "save_intervention=false", "cache=false"]


def sweep(monkeypatch, tmp_path, *args) -> int:
    """`reftbench -m ...` in this process (so a test can watch the objects of each job); its exit code."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["reftbench", "-m", *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}", *args])
    try:
        cli.main()
    except SystemExit as e:
        return e.code
    return 0


def test_a_job_that_runs_out_of_memory_is_freed_before_the_next_job_starts(monkeypatch, tmp_path, capsys):
    refs, alive_at_start = [], []

    def out_of_memory(model, *args, **kwargs):
        alive_at_start.append([r() is not None for r in refs])  # the models of the jobs before this one
        refs.append(weakref.ref(model))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nGPU 0 has a total capacity")

    monkeypatch.setattr(run_module, "train", out_of_memory)
    assert sweep(monkeypatch, tmp_path, "seed=1,2,3") == 2
    assert alive_at_start == [[], [False], [False, False]]
    failures = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/failed.json"))]
    assert [f["overrides"][-1] for f in failures] == ["seed=1", "seed=2", "seed=3"]
    assert all(f["reason"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
               "total capacity" and f["error"] == "OutOfMemoryError" for f in failures)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("reftbench: error: 3 job(s) of the sweep could not run: seed=1 (OutOfMemoryError")
    assert "Traceback" not in last and not list((tmp_path / "sweep").glob("*/result.json"))


def test_the_sweep_goes_on_past_a_failed_job_and_a_later_launch_clears_it(monkeypatch, tmp_path, capsys):
    real_train, calls = run_module.train, []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("something broke\nin the middle of the job")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(run_module, "train", fails_once)
    assert sweep(monkeypatch, tmp_path, "seed=1,2") == 2
    jobs = tmp_path / "sweep"
    (failed,) = jobs.glob("*/failed.json")
    assert json.loads(failed.read_text())["reason"] == "RuntimeError: something broke in the middle of the job"
    assert json.loads(failed.read_text())["overrides"][-1] == "seed=1"
    (done,) = jobs.glob("*/result.json")
    assert json.loads(done.read_text())["seed"] == 2  # the job after the failure ran
    err = capsys.readouterr().err
    assert "1 job(s) of the sweep could not run: seed=1 (RuntimeError: something broke" in err

    # A failure record of another launch in the same folder is not this launch's failure.
    old = jobs / "old_job" / "failed.json"
    old.parent.mkdir()
    old.write_text(json.dumps({"reason": "x", "overrides": ["seed=9"], "launch": "an-earlier-launch"}))
    assert sweep(monkeypatch, tmp_path, "seed=1,2") == 0  # seed=1 runs now, seed=2 is skipped
    assert sorted(p.parent.name for p in jobs.glob("*/failed.json")) == ["old_job"]
    assert sorted(json.loads(p.read_text())["seed"] for p in jobs.glob("*/result.json")) == [1, 2]
    assert "skipped, already done" in capsys.readouterr().out


def test_each_job_measures_its_own_cuda_peak(monkeypatch):
    """CUDA's peak counters run for the process: without a reset a job would report an earlier job's peak."""
    from reftbench import record
    resets = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda i: resets.append(i))
    with record.PeakRSS():
        pass
    assert resets == [0, 1]
