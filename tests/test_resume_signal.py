"""SIGTERM (SLURM's warning before a time-out or preemption) mid-epoch: the run finishes its optimiser
step, saves a checkpoint and exits; the same command then resumes and ends as an uninterrupted run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from reftbench import checkpoint, preempt
from reftbench.run import run

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
# 24 examples, 2 per step, 2 epochs: 24 optimiser steps; the signal stops the run after its first steps
OVERRIDES = ["model=tiny-random-llama", "task.train_limit=24", "task.eval_limit=4", "trainer.batch_size=2",
             "trainer.epochs=2", "intervention.rank=2", "intervention.layers='0;1'", "eval_frozen=false",
             "trainer.keep_checkpoints=true"]


def cfg(*extra):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=OVERRIDES + list(extra))


def weights(out_dir):
    return load_file(str(out_dir / "intervention" / "weights.safetensors"))


def test_sigterm_mid_epoch_saves_and_the_rerun_resumes_to_the_same_weights(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "reftbench.cli", *OVERRIDES, f"hydra.run.dir={out}"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in proc.stdout:  # the run's signal handlers are in place from its first line on; the
            seen.append(line)      # loop stops after its first optimiser step
            if "task chain-sum:" in line:
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "stopped by SIGTERM after optimiser step" in text and "Traceback" not in text
    assert not (out / "result.json").exists()
    stopped_at = int(checkpoint.latest(out / "checkpoints").name.removeprefix("step-"))
    # after step 1 unless the loaded machine let the run go on before the signal was sent
    assert 0 < stopped_at < 24 and "training: 24 optimiser steps from step 0" in text

    again = run(cfg(), out)  # the same command, again in the same folder
    assert again["train"]["resumed_from_step"] == stopped_at and again["train"]["steps"] == 24
    plain = run(cfg(), tmp_path / "uninterrupted")
    assert plain["train"]["resumed_from_step"] is None
    got, expected = weights(out), weights(tmp_path / "uninterrupted")
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.allclose(got[k], expected[k], atol=1e-6), k
    assert again["metrics"]["trained"] == plain["metrics"]["trained"]


def test_signal_handlers_set_a_flag_and_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with preempt.stop_on_signals() as stop:
        assert stop.signum is None
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(100):  # delivered at the next bytecode boundary
            if stop.signum:
                break
            time.sleep(0.01)
        assert stop.signum == signal.SIGUSR1 and stop.submitit_handler() is None
    assert signal.getsignal(signal.SIGUSR1) == before


def test_a_second_signal_stops_at_once(tmp_path):
    code = ("import os, signal, time\nfrom reftbench import preempt\nwith preempt.stop_on_signals() as stop:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(0.2)\n    assert stop.signum == signal.SIGTERM\n"
            "    print('flagged', flush=True)\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(5)\n"
            "print('not reached')\n")
    res = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert res.returncode == -signal.SIGTERM and "flagged" in res.stdout and "not reached" not in res.stdout


def test_in_a_submitit_job_the_loop_hands_the_signal_to_submitit(monkeypatch):
    """submitit installs its handler on its own signal (USR2); after our checkpoint, that handler
    calls the launcher's checkpoint hook, requeues and exits."""
    from submitit.core.job_environment import SignalHandler
    calls = []
    handler = SignalHandler.__new__(SignalHandler)
    monkeypatch.setattr(SignalHandler, "checkpoint_and_try_requeue",
                        lambda self, signum, frame=None: calls.append(signum) or sys.exit(-1), raising=True)
    old = signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)
    try:
        with preempt.stop_on_signals() as stop:
            stop.signum = signal.SIGTERM
            try:
                preempt.hand_over(stop, signal.SIGTERM, 3, True)
            except SystemExit as e:
                assert e.code == -1
            else:
                raise AssertionError("submitit's handler did not run")
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, old)
