"""Data sources, registered by name (a task's `source:` field). Each returns (train, eval) records."""
import json
from pathlib import Path

from ..errors import ReftbenchError

LOADERS = {}


def register(name):
    def deco(fn):
        LOADERS[name] = fn
        return fn
    return deco


@register("reasoning_gym")
def reasoning_gym(task, seed: int):
    """Procedurally generated problems: no download. The data is fixed by the task (generator
    seeds `train_seed`, `test_seed`), not by the run's seed, so every method and seed sees the
    same examples. Training questions that also occur in the test set are dropped."""
    import reasoning_gym as rg
    opts = dict(task.options.get("generator", {}))
    name = task.options["dataset"]
    n_train, n_eval = int(task.train_limit or 1000), int(task.eval_limit or 200)

    def make(size, s):
        return [dict(question=x["question"], answer=str(x["answer"]))
                for x in rg.create_dataset(name, size=size, seed=s, **opts)]

    test = make(n_eval, int(task.options.get("test_seed", 1)))
    held_out = {r["question"] for r in test}
    train = [r for r in make(2 * n_train, int(task.options.get("train_seed", 0))) if r["question"] not in held_out]
    return train[:n_train], test


def read_json_records(path: Path, required: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise ReftbenchError(f"data file {path} is missing: point task.data_dir at a folder holding it")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReftbenchError(f"data file {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) and all(k in r for k in required) for r in data):
        raise ReftbenchError(f"data file {path} must be a JSON list of records with keys {', '.join(required)}")
    return data


@register("llm_adapters")
def llm_adapters(task, seed: int):
    """LLM-Adapters JSON files ({instruction, input, output, answer}) under task.data_dir."""
    if not task.options.get("data_dir"):
        raise ReftbenchError(f"task={task.name} reads local files: set task.data_dir=/path/to/llm-adapters-style/folder")
    root = Path(task.options["data_dir"])
    req = ("instruction", "output", "answer")
    train = read_json_records(root / task.options.get("train_file", "train.json"), req)
    test = read_json_records(root / task.options.get("test_file", "test.json"), req)
    return train, test
