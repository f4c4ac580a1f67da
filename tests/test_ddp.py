"""Two processes (DDP, gloo on the CPU) train as one process does with the same global batch, and
write one run folder with one result.json."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, safe_open

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT / "tests" / "fixtures" / "glue" / "SST-2"
BIN = Path(sys.executable).parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
pytestmark = pytest.mark.skipif(shutil.which("accelerate", path=str(BIN)) is None, reason="accelerate CLI missing")


def launch(args, cwd, port, timeout=300):
    # --multi_gpu is accelerate's torchrun launcher (its --cpu runs one process); without a GPU the
    # loop's Accelerator takes the CPU and the gloo backend
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *args]
    res = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


# A GLUE-style run: its loss is a mean over examples, so the mean of the two processes' means over
# their halves of each global batch is the one-process mean (4 examples, batches of 2: one each).
# base_dropout off: each process draws its own dropout masks, which one process cannot reproduce.
OVERRIDES = ["model=tiny-random-bert", "task=sst2", f"task.data_dir={GLUE}", "trainer.epochs=2",
             "trainer.batch_size=2", "trainer.grad_accum=1", "trainer.lr=1e-2", "intervention.positions=f1",
             "intervention.rank=2", "trainer.base_dropout=false", "eval_frozen=false", "device=auto"]


def test_two_processes_train_like_one_and_write_one_result(tmp_path):
    from reftbench.run import run
    launch(["-m", "reftbench.cli", *OVERRIDES], tmp_path, 29611)
    results = list(tmp_path.rglob("result.json"))
    assert len(results) == 1  # one run folder: the other process took the first one's
    run_dir = results[0].parent
    assert [p for p in tmp_path.rglob(".hydra")] == [run_dir / ".hydra"]
    assert not (run_dir / "checkpoints").exists()  # removed once the run finished
    two = json.loads(results[0].read_text())
    assert two["train"]["processes"] == 2 and two["train"]["steps"] == 4

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=OVERRIDES)
    one = run(cfg, tmp_path / "one")
    assert one["train"]["processes"] == 1 and one["train"]["steps"] == 4
    a, b = (load_file(str(d / "intervention" / f)) for d in (run_dir, tmp_path / "one")
            for f in ["weights.safetensors"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    ha, hb = (load_file(str(d / "intervention" / "head.safetensors")) for d in (run_dir, tmp_path / "one"))
    for k in ha:
        assert torch.allclose(ha[k], hb[k], atol=1e-5), k
    assert two["metrics"] == one["metrics"] or two["metrics"]["trained"]["score"] == one["metrics"]["trained"]["score"]


def two_like_one(tmp_path, names, extra, port):
    """Train `names` with tests/helpers/ddp_train.py on two processes and on one; the trained tensors."""
    sys.path.insert(0, str(ROOT / "tests" / "helpers"))
    import ddp_train
    launch([str(ROOT / "tests" / "helpers" / "ddp_train.py"), str(tmp_path / "two.safetensors"), ",".join(names),
            *extra], tmp_path, port, timeout=600)
    ddp_train.run(tmp_path / "one.safetensors", names, "ckpt" in extra, 1 if "noaccum" in extra else 2)
    with safe_open(str(tmp_path / "two.safetensors"), "pt") as f:
        assert f.metadata()["processes"] == "2"
    two, one = load_file(str(tmp_path / "two.safetensors")), load_file(str(tmp_path / "one.safetensors"))
    assert {k.split(".")[0] for k in one} == set(names) and one.keys() == two.keys()
    return one, two


def test_a_causal_lm_loss_weights_answer_tokens_as_one_process(tmp_path):
    """Answers of 2 to 5 tokens: the two halves of a global batch hold different numbers of answer
    tokens. Each process's mean loss is weighted by its share of them, so DDP's gradient average is the
    one-process mean over all the batch's tokens."""
    one, two = two_like_one(tmp_path, ["loreft"], ["noaccum"], 29631)
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5), (k, (one[k] - two[k]).abs().max())


def test_shard_weights_average_to_one():
    from reftbench.train import loss_items, shard_weight
    assert loss_items({"labels": [-100, -100, 7, 8, 2]}) == 3 and loss_items({"labels": [5, 6, 7]}) == 2
    assert loss_items({"input_ids": [1, 2], "label": 1}) == 1  # a classifier: one term per example
    w = [shard_weight(n, 10, 2) for n in (3, 7)]
    assert w == [0.6, 1.4] and sum(w) / 2 == 1.0  # a term equal on both processes keeps its gradient
    assert shard_weight(5, 10, 2) == 1.0  # equal halves (GLUE): DDP's plain average


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_every_method_trains_under_ddp_like_one_process(tmp_path, checkpointing):
    one, two = two_like_one(tmp_path, ["loreft", "lora", "dora", "red", "full"], ["ckpt"] if checkpointing else [],
                            29621 + checkpointing)
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5), k


# A generation task: 12 test prompts in batches of 4 are 3 batches, so the two processes take 2 and 1.
GEN = ["model=tiny-random-llama", "task=chain-sum", "task.train_limit=16", "task.eval_limit=12", "trainer.epochs=1",
       "trainer.batch_size=4", "trainer.lr=1e-2", "eval_batch_size=4", "device=auto"]


def test_evaluation_is_split_over_the_processes_and_gathered_in_order(tmp_path):
    from reftbench.run import run
    two_dirs = []
    for i in range(2):  # the second launch finds the frozen score the first wrote
        launch(["-m", "reftbench.cli", *GEN, f"cache_dir={tmp_path / 'cache2'}", f"hydra.run.dir={tmp_path / f'two{i}'}"],
               tmp_path, 29641 + i)
        two_dirs.append(json.loads((tmp_path / f"two{i}" / "result.json").read_text()))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*GEN, f"cache_dir={tmp_path / 'cache1'}"])
    one = run(cfg, tmp_path / "one")
    first, again = two_dirs
    assert first["train"]["eval_processes"] == 2 and one["train"]["eval_processes"] == 1
    assert first["cache"]["frozen_score"]["from"] == "computed" and again["cache"]["frozen_score"]["from"] == "cache"
    for two in (first, again):
        assert two["metrics"]["frozen"] == one["metrics"]["frozen"]
        assert two["metrics"]["trained"]["n"] == one["metrics"]["trained"]["n"] == 12
        # the same outputs in the same order: the gather puts each process's batches back in place
        assert [s["output"] for s in two["samples"]] == [s["output"] for s in one["samples"]]


def test_the_prepared_ddp_module_broadcasts_no_buffers(tmp_path):
    launch([str(ROOT / "tests" / "helpers" / "ddp_buffers.py"), str(tmp_path / "ok")], tmp_path, 29617)
    assert (tmp_path / "ok").read_text() == "ok"


def test_a_finished_record_in_a_later_process_folder_does_not_make_it_skip_alone(tmp_path):
    """A process > 0 runs in its working folder until the first process's run folder is broadcast; a
    matching result.json there must not make it skip while the first process trains (the job would hang)."""
    from reftbench.run import run
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=OVERRIDES)
    run(cfg, tmp_path / "single")
    record = (tmp_path / "single" / "result.json").read_text()
    (tmp_path / "result.json").write_text(record)  # rank 1's folder (hydra.run.dir=.) only
    res = launch(["-m", "reftbench.cli", *OVERRIDES], tmp_path, 29619, timeout=240)
    assert "skipped" not in res.stdout
    runs = [p for p in (tmp_path / "outputs").rglob("result.json")]
    assert len(runs) == 1 and json.loads(runs[0].read_text())["train"]["processes"] == 2
    assert (tmp_path / "result.json").read_text() == record  # untouched
