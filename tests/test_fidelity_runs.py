"""Run-level facts that change what a number means: the headline of a several-set task, tasks judged
offline, training examples that do not fit, model selection on NaN scores."""
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from reftbench import evaluate as evaluation, tasks
from reftbench.objectives import Generation
from reftbench.run import run

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "llm-adapters"


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_several_sets_headline_is_the_macro_average(monkeypatch):
    """Two sets of very different sizes: the headline is the mean of the two accuracies (the
    paper's Avg), not the share of all examples correct; both are recorded."""
    cfg = OmegaConf.load(ROOT / "conf" / "task" / "commonsense.yaml")
    task = tasks.build(cfg)
    records = ([{"eval_task": "boolq", "instruction": "q", "answer": "true"}] * 9
               + [{"eval_task": "piqa", "instruction": "q", "answer": "solution1"}])
    outputs = ["the correct answer is true"] * 9 + ["the correct answer is solution2"]  # 9/9 and 0/1
    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: outputs)
    metrics, _ = Generation(task, None, 64).evaluate(None, records, batch_size=4)
    assert metrics["by_task"] == {"boolq": {"accuracy": 1.0, "n": 9}, "piqa": {"accuracy": 0.0, "n": 1}}
    assert metrics["score"] == metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["micro_accuracy"] == pytest.approx(0.9)
    assert metrics["average"] == "macro"


def test_a_task_judged_offline_costs_no_frozen_generation_and_has_no_frozen_score(tmp_path, monkeypatch):
    calls = []
    real = evaluation.generate
    monkeypatch.setattr(evaluation, "generate", lambda *a, **k: calls.append(k.get("desc")) or real(*a, **k))
    cfg = compose_cfg("model=tiny-random-llama", "task=alpaca", f"task.data_dir={FIX}", "task.heldout=1",
                      "task.max_new_tokens=2", "trainer.max_steps=1", "trainer.batch_size=2", "eval_frozen=true")
    rec = run(cfg, tmp_path)
    assert calls == ["eval trained"]  # one generation pass: the trained model's answers for the judge
    frozen = rec["metrics"]["frozen"]
    assert "score" not in frozen and "accuracy" not in frozen and frozen["heldout_loss"] > 0
    from reftbench import report
    (row,) = report.tables([rec])["results"]
    assert row["frozen"] is None and row["judged_offline"]  # a gap in the report, not 0.0
    assert "frozen" not in report.markdown([row]).splitlines()[0]  # no frozen column of zeros


def test_training_examples_that_do_not_fit_are_counted_and_recorded(tmp_path, caplog):
    """chain-sum prompts are ~60 characters: at max_length 40 (characters, on the tiny model's
    character tokenizer) every prompt fills it; at 70 the answers are cut."""
    base = ["model=tiny-random-llama", "trainer.max_steps=1", "task.train_limit=8", "task.eval_limit=2",
            "trainer.batch_size=4", "eval_frozen=false", "task.max_new_tokens=2", "save_intervention=false"]
    from reftbench.objectives import Generation
    from reftbench.models import char_tokenizer
    task = tasks.build(compose_cfg(*base).task)
    train = task.load_splits(42)["train"]
    lengths = [len(task.prompt(r)) + 1 for r in train]  # + BOS
    cut = sorted(lengths)[len(lengths) // 2]  # half the prompts fill max_length
    stats = {}
    kept = Generation(task, char_tokenizer(), cut).encode(train, stats)
    dropped = sum(n >= cut for n in lengths)
    assert 0 < dropped < len(train) and len(kept) == len(train) - dropped
    assert stats == {"train_records": len(train), "train_dropped_too_long": dropped,
                     "train_truncated": len(kept), "max_length": cut}  # every kept one lost its answer's end
    with caplog.at_level("WARNING", logger="reftbench"):
        rec = run(compose_cfg(*base, f"trainer.max_length={cut}"), tmp_path)
    assert rec["data"]["train_dropped_too_long"] == dropped
    assert json.loads((tmp_path / "result.json").read_text())["data"] == rec["data"]
    assert any("dropped" in m for m in caplog.messages)


def test_table3_trains_on_all_of_pyrefts_ultrafeedback_file(tmp_path):
    """pyreft's train.json format ({instruction, input (optional), output: the chosen response}),
    given by its absolute path; the table row holds nothing out, and the record names the file."""
    train = FIX / "ultrafeedback" / "train.json"
    records = json.loads(train.read_text())
    cfg = compose_cfg("experiment=table3_loreft_llama2-7b", "model=tiny-random-llama", f"task.files.train={train}",
                      f"task.files.test={FIX / 'alpaca_eval.json'}", "task.max_new_tokens=2", "trainer.max_steps=1",
                      "trainer.grad_accum=1", "intervention.layers='0;3'", "save_intervention=false")
    assert cfg.task.heldout == 0
    rec = run(cfg, tmp_path, overrides=[f"task.files.train={train}"])
    assert rec["data"]["train_records"] == len(records) == 4 and rec["data"]["train_dropped_too_long"] == 0
    assert "heldout_loss" not in rec["metrics"]["trained"] and "frozen" not in rec["metrics"]
    (used,) = rec["data"]["files"]["train"]
    assert used["path"] == str(train) and len(used["sha256"]) == 64
    # not pyreft's bytes: a variant in the report, not the paper's LoReFT row
    from reftbench import report
    rows = report.tables([rec])["table3"]
    assert all(r["paper"] is None for r in rows if r["model"] == "tiny-random-llama")
    task = tasks.build(cfg.task)
    assert [task.prompt(r) for r in records][2].endswith("### Input:\nThe cat sleeps.\n\n### Response:\n")
