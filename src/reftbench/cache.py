"""On-disk caches the runs of a sweep share: the frozen model's score and tokenised training data.

Each entry is named by a hash of everything that can change it, so a hit is always safe to reuse:
other seeds, methods and learning rates of the same model and test set hit, a new weight, test
example, tokenizer, generation setting, precision policy or scoring/encoding code misses. The folder is `cache_dir` (default
$REFTBENCH_CACHE or ~/.cache/reftbench), shared by every process that can see it: put it on a
shared filesystem and the jobs of a SLURM array score the frozen model once between them. Files are
written atomically; a lock next to an entry makes concurrent jobs wait for the one computing it.
Clear it by deleting the folders `frozen/` and `tokens/` in it.
"""
import hashlib
import importlib
import inspect
import json
import logging
import socket
import sysconfig
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .atomic import atomic_path
from .data import Examples
from .objectives import count_lengths

log = logging.getLogger("reftbench")


def root(cfg) -> Path | None:
    """The cache folder a run uses, or None when caching is off (`cache=false`)."""
    if not cfg.get("cache", True):
        return None
    if cfg.get("cache_dir"):
        return Path(str(cfg.cache_dir)).expanduser()
    from .models import cache_dir
    return cache_dir()


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of the weights as they are in memory: every tensor's name, shape, dtype and sum, and a
    strided sample of its values. Covers every way a model is made (files, GGUF, random with a seed)
    at the cost of one read of the weights."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024].to("cpu", torch.float64)
        total = torch.sum(flat, dtype=torch.float64).item() if flat.numel() else 0.0
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{total!r}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    special = {k: getattr(tok, k, None) for k in ("bos_token", "eos_token", "pad_token", "padding_side")}
    return digest([hashlib.sha256(text.encode()).hexdigest(), special, type(tok).__name__])


def _versions() -> dict:
    from .record import versions
    v = versions()
    return {k: v.get(k) for k in ("reftbench", "torch", "transformers", "tokenizers")}

# The code that decides each cached value. Its source is hashed into the key (the package version
# stays 0.1.0 while the code changes), read at call time: an edited file or a patched function misses.
FROZEN_CODE = ("reftbench.evaluate", "reftbench.objectives", "reftbench.data", "reftbench.tasks.base",
               "reftbench.tasks.answers", "reftbench.tasks.metrics", "reftbench.tasks.protocols")
TOKENS_CODE = ("reftbench.objectives", "reftbench.data", "reftbench.tasks.base", "reftbench.tasks.protocols")
_LIBRARY_DIRS = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})


def code_fingerprint(module_names) -> str:
    """A hash of what the modules hold now: the source of each function and class that is not a
    library's (a library's is named; its version is in the key), methods one by one, and constants."""
    h = hashlib.sha256()
    for name in module_names:
        module = importlib.import_module(name)
        for attr, obj in sorted(vars(module).items()):
            if not attr.startswith("__") and not inspect.ismodule(obj):  # constants too: templates, tables
                h.update(f"{name}.{attr}={_describe(obj)}\n".encode())
    return h.hexdigest()


def _describe(obj, depth: int = 0) -> str:
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, property):
        return "property:" + _describe(obj.fget, depth)
    if inspect.isfunction(obj) or inspect.isclass(obj):
        where = f"{obj.__module__}.{obj.__qualname__}"
        try:
            file = inspect.getsourcefile(obj)
        except TypeError:  # built in
            file = None
        library = file is not None and file.startswith(_LIBRARY_DIRS) and not obj.__module__.startswith("reftbench")
        if file is None or library or depth > 1:
            return where
        if inspect.isclass(obj):  # its members as they are now, so a patched method counts
            return where + "{" + ";".join(f"{k}={_describe(v, depth + 1)}" for k, v in sorted(vars(obj).items())
                                          if not k.startswith("__") or k == "__init__") + "}"
        try:
            return inspect.getsource(obj)
        except (OSError, TypeError):
            return where
    if isinstance(obj, (str, int, float, bool, type(None))):
        return repr(obj)
    if isinstance(obj, (set, frozenset)):
        return "{" + ",".join(sorted(_describe(v, depth) for v in obj)) + "}"
    if isinstance(obj, (tuple, list)):
        return "[" + ",".join(_describe(v, depth) for v in obj) + "]"
    if isinstance(obj, dict):
        return "{" + ",".join(f"{k!r}:{_describe(v, depth)}" for k, v in obj.items()) + "}"
    return type(obj).__qualname__


@contextmanager
def _lock(path: Path):
    """Hold `path`.lock while computing an entry, so the jobs that want it at the same time compute it
    once. The OS drops the lock of a killed process. A filesystem without locks: no lock, same result."""
    from filelock import FileLock
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def frozen_key(cfg, model, objective, records) -> dict:
    """What the frozen model's score depends on. Not the seed, method or trainer: they do not touch
    the untrained model (a random model's seed changes its weights, and so its fingerprint)."""
    from omegaconf import OmegaConf
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    model_cfg.pop("path", None)  # where the weights lie does not matter, what they are does
    task_cfg = OmegaConf.to_container(cfg.task, resolve=True)
    for k in ("train_limit", "heldout"):  # training-only settings
        task_cfg.pop(k, None)
    device = next(model.parameters()).device  # where it ran (device=auto resolved), not what was asked
    from .precision import resolve
    generation = getattr(model, "generation_config", None)
    return {"model": model_cfg, "weights": weights_fingerprint(model), "tokenizer": tokenizer_fingerprint(objective.tok),
            "task": task_cfg, "objective": type(objective).__name__, "test_set": digest(records),
            "eval_batch_size": int(cfg.eval_batch_size),  # padding differs with the batch: numerics can too
            "precision": resolve(cfg.trainer.precision, cfg.model.get("dtype", "float32")),  # the autocast it ran in
            "generation_config": generation.to_dict() if generation is not None else None,
            "code": code_fingerprint(FROZEN_CODE),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
            "versions": _versions()}


def frozen_score(cfg, model, objective, records, compute) -> tuple[dict, dict]:
    """The frozen model's metrics on `records` and where they came from: {"from": "cache" or
    "computed", "file": the cache entry}. `compute()` scores the model; it runs on a miss only."""
    base = root(cfg)
    if base is None:
        return compute(), {"from": "computed", "file": None}
    key = frozen_key(cfg, model, objective, records)
    path = base / "frozen" / f"{digest(key)}.json"
    if distributed.shard()[1] > 1:  # a DDP run scores it together: every process must take one branch
        return _frozen_sharded(path, key, compute)
    entry = _read_json(path)
    if entry is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _lock(path):
            entry = _read_json(path)  # another job may have written it while this one waited
            if entry is None:
                metrics = compute()
                _write_frozen(path, key, metrics)
                return metrics, {"from": "computed", "file": str(path)}
    return entry["metrics"], {"from": "cache", "file": str(path)}


def _write_frozen(path: Path, key: dict, metrics: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"metrics": metrics, "key": key, "host": socket.gethostname(),
                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))


def _frozen_sharded(path: Path, key: dict, compute) -> tuple[dict, dict]:
    """The first process's read decides for all (the cache may be local to its node); on a miss every
    process scores its share, and the first writes the entry. No lock: a lock one process holds while
    the others wait in the evaluation's gather would deadlock, and a duplicate write is the same entry."""
    first = distributed.shard()[0] == 0
    entry = distributed.from_first(_read_json(path) if first else None)
    if entry is not None:
        return entry["metrics"], {"from": "cache", "file": str(path)}
    metrics = compute()
    if first:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_frozen(path, key, metrics)
    return metrics, {"from": "computed", "file": str(path)}


# Every task field that can change how a record becomes tokens (the records themselves are digested).
ENCODING_FIELDS = ("name", "version", "kind", "protocol", "template", "input_template", "target",
                   "train_template", "train_input_template", "loss_on_prompt", "options")


def tokens_key(objective, records) -> dict:
    task = objective.task
    return {"tokenizer": tokenizer_fingerprint(objective.tok), "objective": type(objective).__name__,
            "task": {k: getattr(task, k) for k in ENCODING_FIELDS},
            "max_length": int(objective.max_length), "records": digest(records), "code": code_fingerprint(TOKENS_CODE),
            "versions": _versions()}


def tokenised(cfg, objective, records, stats: dict | None = None) -> tuple[Examples, dict]:
    """objective.encode(records, stats), read from the cache when the same tokenizer, task version,
    max_length and records were encoded before (commonsense_170k takes minutes to tokenise).
    `stats` gets the counts of cut and dropped examples either way."""
    base = root(cfg)
    if base is None or not records:
        return objective.encode(records, stats), {"from": "computed", "file": None}
    path = base / "tokens" / f"{digest(tokens_key(objective, records))}.npz"
    examples = _load_examples(path)
    if examples is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _lock(path):
            examples = _load_examples(path)
            if examples is None:
                examples = objective.encode(records, stats)
                if examples:  # none fits max_length: the run stops with that message, nothing to keep
                    _save_examples(path, examples)
                return examples, {"from": "computed", "file": str(path)}
    count_lengths(examples, len(records), objective.max_length, stats)
    return examples, {"from": "cache", "file": str(path)}


def _save_examples(path: Path, examples) -> None:
    """The compact table's arrays as they are (data.Examples): token ids end to end with offsets."""
    if not isinstance(examples, Examples):
        examples = Examples.build(examples)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **examples.arrays())


def _load_examples(path: Path) -> Examples | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            return Examples.from_arrays({k: data[k] for k in data.files})
    except (OSError, ValueError, KeyError):
        return None  # missing, partial or of the old layout (no offsets): encode again
