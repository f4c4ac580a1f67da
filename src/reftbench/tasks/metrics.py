"""Scores beyond per-example accuracy: GLUE metrics, the GLUE validation split, per-data-set
accuracy for tasks that evaluate on several sets, and AlpacaEval output files.

GLUE metrics use scikit-learn and scipy, not `evaluate.load("glue")`, which fetches a script
from the hub and fails offline. Keys match that metric's so numbers compare with pyreft's."""
import json
from collections import defaultdict
from pathlib import Path

GLUE_TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb")


def glue_metrics(name: str, preds, labels) -> dict:
    """What `evaluate.load("glue", name).compute(...)` returns, plus `combined_score` (the mean)
    when there are several, as pyreft examples/loreft/train.py reports it."""
    import numpy as np
    if name not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}: choose one of {', '.join(GLUE_TASKS)}")
    preds, labels = np.asarray(preds), np.asarray(labels)
    if name == "stsb":
        from scipy.stats import pearsonr, spearmanr
        out = {"pearson": float(pearsonr(preds, labels)[0]), "spearmanr": float(spearmanr(preds, labels)[0])}
    elif name == "cola":
        from sklearn.metrics import matthews_corrcoef
        out = {"matthews_correlation": float(matthews_corrcoef(labels, preds))}
    else:
        from sklearn.metrics import accuracy_score, f1_score
        out = {"accuracy": float(accuracy_score(labels, preds))}
        if name in ("mrpc", "qqp"):
            out["f1"] = float(f1_score(labels, preds))
    if len(out) > 1:
        out["combined_score"] = float(np.mean(list(out.values())))
    return out


def selection_size(n: int) -> int:
    """pyreft examples/loreft/train.py: 1,000 examples of a validation set larger than 5,000 go to
    model selection during training, otherwise half (rounded down)."""
    return 1000 if n > 5000 else n // 2


def split_validation(records: list, seed: int) -> tuple[list, list]:
    """(selection, test): the GLUE validation set split into an in-training selection part and a
    held-out test part. Same order and sizes as pyreft's
    `torch.utils.data.random_split(val, [n - k, k])`, drawn from a generator seeded with `seed`
    (pyreft draws from the global generator after `set_seed(seed)`), so it is deterministic."""
    import torch
    n, k = len(records), selection_size(len(records))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return [records[i] for i in perm[n - k:]], [records[i] for i in perm[: n - k]]


def accuracy_by_eval_task(task, records: list[dict], outputs: list[str]) -> dict:
    """{eval set: {accuracy, n}} for tasks such as `commonsense` and `math` whose test records
    carry an `eval_task` field (one training run, several test sets)."""
    groups = defaultdict(list)
    for r, o in zip(records, outputs):
        groups[r.get("eval_task", task.name)].append(task.is_correct(o, r))
    return {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in groups.items()}


def alpaca_eval_records(records: list[dict], outputs: list[str], generator: str) -> list[dict]:
    """AlpacaEval's model-output format: a list of {instruction, output, generator} (plus the
    instruction's `dataset` when known). Outputs are left-stripped as pyreft compute_metrics.py
    does with the text after "### Response:"."""
    if len(records) != len(outputs):
        raise ValueError(f"{len(records)} records but {len(outputs)} outputs")
    rows = []
    for r, o in zip(records, outputs):
        row = {"instruction": r["instruction"], "output": o.lstrip(), "generator": generator}
        if r.get("dataset"):
            row["dataset"] = r["dataset"]
        rows.append(row)
    return rows


def write_alpaca_eval(path, records: list[dict], outputs: list[str], generator: str) -> Path:
    """Write the file `alpaca_eval --model_outputs <path>` reads."""
    from ..atomic import atomic_path
    path = Path(path)
    with atomic_path(path) as tmp:  # a resumed sweep never reads half a file
        tmp.write_text(json.dumps(alpaca_eval_records(records, outputs, generator), indent=2, ensure_ascii=False))
    return path
