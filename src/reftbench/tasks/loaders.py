"""Data sources, registered by name (a task's `source:` field). Each returns {role: records}:
"train" and "test" (or one role per name in task.eval_tasks; "validation" for GLUE).

Local files come first: set `task.data_dir=` and each role reads `task.files[role]` under it.
Without data_dir a role is loaded with `datasets.load_dataset(**task.hub[role])` (online only)."""
import csv
import json
import logging
from pathlib import Path

from ..errors import ReftbenchError

log = logging.getLogger(__name__)
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
    # reasoning-gym draws item i from seed + i, so seed 1's stream is seed 0's shifted by one: up to
    # n_eval of the first training candidates are test questions. Draw more until n_train remain (the
    # first items never change with the size, so the default 1000/200 split is the same as ever).
    size, train_seed = 2 * n_train, int(task.options.get("train_seed", 0))
    for _ in range(8):
        train = [r for r in make(size, train_seed) if r["question"] not in held_out]
        if len(train) >= n_train:
            break
        size *= 2
    else:
        log.warning("task %s: only %d training questions not in the test set (train_limit=%d)",
                    task.name, len(train), n_train)
    return {"train": train[:n_train], "test": test}


def read_json_records(path: Path, required: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise ReftbenchError(f"data file {path} is missing: point task.data_dir at a folder holding it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReftbenchError(f"data file {path} is not valid JSON ({_first_line(e)})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) and all(k in r for k in required) for r in data):
        raise ReftbenchError(f"data file {path} must be a JSON list of records with keys {', '.join(required)}")
    return data


def read_tsv(path: Path, header: list[str] | None = None) -> list[dict]:
    """A GLUE TSV: tab-separated, first row the column names unless `header` is given. No quote
    handling: GLUE sentences contain bare quotes (csv.QUOTE_NONE, as the GLUE processors do)."""
    if not path.is_file():
        raise ReftbenchError(f"data file {path} is missing: point task.data_dir at a folder holding it")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    first = 1  # the file's line number of rows[0]
    if not header:
        if not rows:
            raise ReftbenchError(f"data file {path} is empty: expected a TSV with a header row")
        header, rows, first = rows[0], rows[1:], 2
    out = []
    for i, row in enumerate(rows):
        if len(row) != len(header):  # a stray tab would shift every later column (the label among them)
            raise ReftbenchError(f"data file {path} line {i + first}: {len(row)} columns, expected {len(header)} "
                                 f"({', '.join(header)}){': a stray tab?' if len(row) > len(header) else ''}")
        out.append(dict(zip(header, row)))
    return out


def fingerprint(path: Path) -> dict:
    """A data file's identity: sha256 of its bytes and its git blob id (`git hash-object`), the two
    forms in which the paper's files are published (a git tree, a Git LFS pointer)."""
    import hashlib
    data = path.read_bytes()
    blob = hashlib.sha1(b"blob %d\0" % len(data))
    blob.update(data)
    return {"path": str(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "git_sha1": blob.hexdigest()}


def matches(checksum: str, files: list[dict]) -> bool:
    """Whether one file read for a role is the file `checksum` ("git-sha1:<hex>" / "sha256:<hex>") names."""
    kind, _, value = str(checksum).partition(":")
    key = {"git-sha1": "git_sha1", "sha256": "sha256"}.get(kind)
    return key is not None and len(files) == 1 and files[0].get(key) == value.lower()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _data_dir(task) -> Path | None:
    d = task.options.get("data_dir")
    return Path(d).expanduser() if d else None


def _local_root(task, role: str) -> Path | None:
    """Where a role's files are read from: task.data_dir, or / for files named by absolute paths
    (task.files.train=/data/train.json needs no data_dir); None: the hub."""
    root = _data_dir(task)
    spec = task.files.get(role)
    given = [spec] if isinstance(spec, str) else list(spec or [])
    if root is None and given and all(Path(p).expanduser().is_absolute() for p in given):
        return Path("/")
    return root


def _role(task, role: str, read) -> list[dict]:
    """One role's records: `read(path)` for each local file (a list of files is concatenated),
    else the hub."""
    root = _local_root(task, role)
    spec = task.files.get(role)
    given = [spec] if isinstance(spec, str) else list(spec or [])
    if root is not None:
        if not spec:
            raise ReftbenchError(f"task={task.name} names no local file for its {role} data: set task.files.{role}=")
        paths = [root / Path(p).expanduser() for p in given]
        records = [r for p in paths for r in read(p)]
        task.loaded_files[role] = [fingerprint(p) for p in paths]  # which data made the number
        return records
    if role not in task.hub:
        raise ReftbenchError(f"task={task.name} reads local files: set task.data_dir=/path/to/folder "
                             f"(holding {task.files.get(role, 'its files')})")
    return from_hub(task, role)


def from_hub(task, role: str) -> list[dict]:
    kwargs = dict(task.hub[role])
    convert = CONVERTERS[kwargs.pop("convert")] if "convert" in kwargs else None
    what = kwargs.get("data_files") if kwargs.get("path") == "json" else kwargs.get("path")
    try:
        from datasets import load_dataset
        ds = load_dataset(**kwargs)
    except Exception as e:  # offline, missing repo, bad split: one line, not a traceback
        raise ReftbenchError(f"task={task.name}: cannot load {what} ({_first_line(e)[:200]}); offline, download it "
                             f"once and set task.data_dir=/folder/holding/{task.files.get(role, role)}") from None
    records = [dict(r) for r in ds]
    return [convert(r) for r in records] if convert else records


def _best_completion(r: dict) -> dict:
    """openbmb/UltraFeedback rows -> {instruction, input, output}: the completion with the highest
    `overall_score`. An assumption: the paper does not spell out its UltraFeedback preprocessing."""
    best = max(r["completions"], key=lambda c: float(c.get("overall_score") or 0))
    return {"instruction": r["instruction"], "input": "", "output": best["response"]}


CONVERTERS = {"best_completion": _best_completion}


@register("llm_adapters")
def llm_adapters(task, seed: int):
    """JSON lists of {instruction, input, output, answer} (the LLM-Adapters format; AlpacaEval's
    805 instructions and Alpaca-style training sets fit it too). Roles: train, then test or each
    name in task.eval_tasks. A role with no file and no hub entry (e.g. `files.train: null`) is
    empty."""
    out = {}
    for role in ["train"] + (list(task.eval_tasks) or ["test"]):
        required = task.record_fields("train" if role == "train" else "test")
        if not task.files.get(role) and role not in task.hub:
            out[role] = []
            continue
        records = _role(task, role, lambda p, req=required: read_json_records(p, req))
        missing = sorted({k for r in records[:1] for k in required if k not in r})
        if missing:
            raise ReftbenchError(f"task={task.name}: {role} data lacks {', '.join(missing)}")
        out[role] = records
    return out


@register("glue")
def glue(task, seed: int):
    """GLUE as {text, text_pair, label} records: `columns` name the text fields of the hub data
    (pyreft examples/loreft/dataset.py glue_task_to_keys); local TSVs use `tsv_columns`,
    `tsv_label` (and `tsv_header` when the file has none, as CoLA's), with `label_names`
    turning label strings into indices in the hub's order."""
    o = task.options
    columns = list(o.get("columns") or [])
    tsv_columns = list(o.get("tsv_columns") or columns)
    label_names = list(o.get("label_names") or [])
    regression = task.num_labels == 1

    def label(value, where):
        try:
            if regression:
                return float(value)
            return label_names.index(value) if value in label_names else int(value)
        except ValueError:
            raise ReftbenchError(f"{where}: label {value!r} is not "
                                 f"{'a number' if regression else 'one of ' + ', '.join(label_names or ['0', '1', '...'])}") from None

    def normal(rows, cols, label_col, where):
        if rows and any(c not in rows[0] for c in cols + [label_col]):
            raise ReftbenchError(f"{where} must have the columns {', '.join(cols + [label_col])}; "
                                 f"it has {', '.join(rows[0])}")
        return [{"text": r[cols[0]], "text_pair": r[cols[1]] if len(cols) > 1 else None,
                 "label": label(r[label_col], where)} for r in rows]

    out = {}
    for role in ("train", "validation"):
        if _local_root(task, role) is not None:
            out[role] = _role(task, role, lambda p: normal(read_tsv(p, o.get("tsv_header")), tsv_columns,
                                                           o.get("tsv_label", "label"), f"data file {p}"))
        else:
            out[role] = normal(_role(task, role, None), columns, "label", f"task={task.name} hub {role} data")
    return out
