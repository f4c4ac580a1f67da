"""A finished run, loaded back: the base model rebuilt from the config recorded in result.json, the
trained method from intervention/ (method.json + weights.safetensors), and a GLUE head beside it.

A run folder holds result.json (its `config` is the whole resolved config) and, unless it was run
with save_intervention=false, intervention/. Nothing else is needed: the base model is loaded the way
the run loaded it (the same source, path and seed, so a random test model has the same weights).
"""
import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from ..errors import ConfigError


@dataclass
class LoadedRun:
    model: object
    tokenizer: object
    method: object
    record: dict
    kind: str  # "decoder" or "encoder"
    dir: Path


def read_record(run_dir) -> dict:
    """The run's result.json; one-line errors for a missing folder, record or saved weights."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir} is not a folder: pass a run folder (the one holding result.json)")
    path = run_dir / "result.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{run_dir} holds no result.json: pass a finished run's folder") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} cannot be read ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ConfigError(f"{path} has no recorded config: it is not a reftbench result")
    if not (run_dir / "intervention" / "method.json").is_file():
        raise ConfigError(f"run {run_dir} has no saved weights (intervention/method.json): "
                          "it was run with save_intervention=false; run it again with save_intervention=true")
    return record


def model_kind(cfg) -> tuple[str, int | None]:
    """Which model class the run's task needed (decoder or encoder) and its number of labels."""
    from .. import tasks
    from ..objectives import OBJECTIVES
    task = tasks.build(cfg.task)
    return OBJECTIVES[task.kind].model_kind, task.num_labels


def load_base(record: dict, device: str = "cpu"):
    """The untouched base model and tokenizer of a run, as the run loaded them."""
    from .. import models
    cfg = OmegaConf.create(record["config"])
    kind, num_labels = model_kind(cfg)
    loaded = models.load(cfg.model, kind=kind, num_labels=num_labels, seed=int(cfg.seed))
    return loaded.model.to(device), loaded.tokenizer, kind


def load_head(model, run_dir: Path) -> None:
    """A GLUE run's trained classification head (saved under the model's own parameter names)."""
    head = Path(run_dir) / "intervention" / "head.safetensors"
    if head.is_file():
        from safetensors.torch import load_file
        model.load_state_dict(load_file(str(head)), strict=False)


def load_run(run_dir, device: str = "cpu") -> LoadedRun:
    from .. import methods
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    model, tok, kind = load_base(record, device)
    method = methods.load(run_dir / "intervention", model).to(device)
    method.train(False)
    load_head(model, run_dir)
    return LoadedRun(model, tok, method, record, kind, run_dir)
