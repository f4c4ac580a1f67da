"""On-disk caches the runs of a sweep share: the frozen model's score and tokenised training data.

Each entry is named by a hash of everything that can change it, so a hit is always safe to reuse:
other seeds, methods and learning rates of the same model and test set hit, a new weight, test
example, tokenizer or generation setting misses. The folder is `cache_dir` (default
$REFTBENCH_CACHE or ~/.cache/reftbench), shared by every process that can see it: put it on a
shared filesystem and the jobs of a SLURM array score the frozen model once between them. Files are
written atomically; a lock next to an entry makes concurrent jobs wait for the one computing it.
Clear it by deleting the folders `frozen/` and `tokens/` in it.
"""
import hashlib
import json
import logging
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .atomic import atomic_path
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
    return {"model": model_cfg, "weights": weights_fingerprint(model), "tokenizer": tokenizer_fingerprint(objective.tok),
            "task": task_cfg, "objective": type(objective).__name__, "test_set": digest(records),
            "eval_batch_size": int(cfg.eval_batch_size),  # padding differs with the batch: numerics can too
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
            "max_length": int(objective.max_length), "records": digest(records), "versions": _versions()}


def tokenised(cfg, objective, records, stats: dict | None = None) -> tuple[list[dict], dict]:
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


def _save_examples(path: Path, examples: list[dict]) -> None:
    """Lists of token ids are stored end to end with their lengths; numbers as one array per field."""
    arrays = {}
    for k, first in examples[0].items():
        if isinstance(first, (list, tuple)):
            arrays[f"{k}.values"] = np.fromiter((x for e in examples for x in e[k]), dtype=np.int64)
            arrays[f"{k}.lengths"] = np.array([len(e[k]) for e in examples], dtype=np.int64)
        else:
            arrays[k] = np.array([e[k] for e in examples])
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _load_examples(path: Path) -> list[dict] | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError):
        return None
    columns = {}
    for k, a in arrays.items():
        if k.endswith(".values"):
            name = k[: -len(".values")]
            ends = np.cumsum(arrays[f"{name}.lengths"])
            columns[name] = [v.tolist() for v in np.split(a, ends[:-1])]
        elif not k.endswith(".lengths"):
            columns[k] = a.tolist()
    n = len(next(iter(columns.values())))
    return [{k: col[i] for k, col in columns.items()} for i in range(n)]
