"""GLUE metrics against hand-computed values, the GLUE validation split, per-set accuracy and the
AlpacaEval output file."""
import json
import math

import pytest

from reftbench.tasks import Task
from reftbench.tasks.metrics import (accuracy_by_eval_task, alpaca_eval_records, glue_metrics, selection_size,
                                     split_validation, write_alpaca_eval)


def test_cola_matthews_by_hand():
    # labels 1 1 0 0, preds 1 0 0 0: TP=1 FN=1 TN=2 FP=0 -> (1*2 - 0*1) / sqrt(1*2*2*3)
    m = glue_metrics("cola", [1, 0, 0, 0], [1, 1, 0, 0])
    assert m == {"matthews_correlation": pytest.approx(2 / math.sqrt(12))}


def test_stsb_pearson_by_hand():
    # x = 1 2 3, y = 1 2 4: deviations (-1 0 1), (-4/3 -1/3 5/3); r = 3 / (sqrt(2) * sqrt(42)/3)
    m = glue_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 2.0, 4.0])
    r = 9 / math.sqrt(84)
    assert m["pearson"] == pytest.approx(r)
    assert m["spearmanr"] == pytest.approx(1.0)
    assert m["combined_score"] == pytest.approx((r + 1) / 2)


def test_accuracy_and_f1_by_hand():
    # labels 1 1 0 0, preds 1 0 1 0: 2 of 4 right; TP=1 FP=1 FN=1 -> F1 = 2/(2+1+1)
    assert glue_metrics("mrpc", [1, 0, 1, 0], [1, 1, 0, 0]) == {"accuracy": 0.5, "f1": 0.5, "combined_score": 0.5}
    assert glue_metrics("qqp", [1, 1, 1, 0], [1, 1, 0, 0])["f1"] == pytest.approx(0.8)
    for name in ("sst2", "mnli", "qnli", "rte"):
        assert glue_metrics(name, [0, 1, 2, 1], [0, 1, 1, 1]) == {"accuracy": 0.75}
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue_metrics("wnli2", [0], [0])


@pytest.mark.parametrize("name,n,select", [
    ("mnli matched", 9815, 1000), ("qqp", 40430, 1000), ("qnli", 5463, 1000),
    ("sst2", 872, 436), ("cola", 1043, 521), ("stsb", 1500, 750), ("mrpc", 408, 204), ("rte", 277, 138),
    ("exactly 5,000", 5000, 2500), ("5,001", 5001, 1000),
])
def test_glue_split_sizes(name, n, select):
    assert selection_size(n) == select
    sel, test = split_validation(list(range(n)), seed=42)
    assert (len(sel), len(test)) == (select, n - select)
    assert sorted(sel + test) == list(range(n))  # a partition


def test_glue_split_is_deterministic_per_seed():
    records = [{"i": i} for i in range(300)]
    a, b = split_validation(records, 42), split_validation(records, 42)
    assert a == b
    assert split_validation(records, 43)[0] != a[0]
    # the same permutation as pyreft's torch.utils.data.random_split(val, [n - k, k]) with this generator
    import torch
    test_part, sel_part = torch.utils.data.random_split(range(300), [150, 150],
                                                        generator=torch.Generator().manual_seed(42))
    assert [r["i"] for r in a[0]] == list(sel_part) and [r["i"] for r in a[1]] == list(test_part)


def test_accuracy_by_eval_task():
    task = Task(name="math", version=1, source="llm_adapters", template="{instruction}", target="{output}",
                answer="math")
    records = [{"answer": "5", "eval_task": "gsm8k"}, {"answer": "6", "eval_task": "gsm8k"},
               {"answer": "B", "eval_task": "aqua"}]
    outputs = ["The answer is 5.", "The answer is 5.", "The answer is (B)."]
    assert accuracy_by_eval_task(task, records, outputs) == {"gsm8k": {"accuracy": 0.5, "n": 2},
                                                             "aqua": {"accuracy": 1.0, "n": 1}}


def test_alpaca_eval_format(tmp_path):
    records = [{"instruction": "Say hi.", "dataset": "helpful_base"}, {"instruction": "Count to 3.", "input": ""}]
    outputs = ["\nHi!", " 1, 2, 3"]
    rows = alpaca_eval_records(records, outputs, "llama-2-7b-loreft")
    assert rows == [{"instruction": "Say hi.", "output": "Hi!", "generator": "llama-2-7b-loreft", "dataset": "helpful_base"},
                    {"instruction": "Count to 3.", "output": "1, 2, 3", "generator": "llama-2-7b-loreft"}]
    path = write_alpaca_eval(tmp_path / "out" / "alpaca_eval.json", records, outputs, "llama-2-7b-loreft")
    assert json.loads(path.read_text()) == rows
    with pytest.raises(ValueError):
        alpaca_eval_records(records, outputs[:1], "g")
