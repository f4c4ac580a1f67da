"""One run, top to bottom: config → model → method → task data → train → evaluate → record."""
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from . import methods, models, tasks
from .data import encode_example
from .errors import ConfigError
from .evaluate import evaluate
from .record import PeakRSS, command_line, git_commit, peak_memory, versions, write_json_atomic
from .train import check_trainer, train

log = logging.getLogger("reftbench")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is visible: use device=cpu")
    return dev


def check_run(cfg) -> None:
    for key in ("seed", "eval_batch_size"):
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
            raise ConfigError(f"{key}={value!r} must be a {'non-negative' if key == 'seed' else 'positive'} integer")


def check_generation_task(task) -> None:
    # GLUE's sequence-classification loop (a head on an encoder, best checkpoint on the selection
    # split) is not built yet; say so before any weights load.
    if task.kind != "generation":
        raise ConfigError(f"task={task.name} is a {task.kind} task: the sequence-classification loop is not "
                          "implemented yet; generation tasks (commonsense, arithmetic, instruction) run today")


def plan(cfg) -> dict:
    """What a run would do and what it would train, from shipped architecture files on the meta
    device: no weights, no data, nothing written."""
    check_run(cfg)
    task = tasks.build(cfg.task)
    check_trainer(cfg.trainer)
    model = models.build_meta(cfg.model, kind="decoder")
    method = methods.build(cfg.intervention, model)
    return {"model": cfg.model.name, "task": task.name, "method": cfg.intervention.name, "seed": int(cfg.seed),
            "params": method.param_counts()}


def plan_line(p: dict) -> str:
    c = p["params"]
    return (f"dry run: {p['method']} on {p['task']} ({p['model']}, seed {p['seed']}): "
            f"{c['trainable']:,} trainable of {c['base']:,} base params ({c['percent']:.3f}%)")


def run(cfg, out_dir: Path, overrides: list[str] | None = None) -> dict:
    with PeakRSS() as rss:
        record = _run(cfg, Path(out_dir))
    record["memory"] = peak_memory(pick_device(cfg.device), rss)
    record["overrides"] = list(overrides or [])
    write_json_atomic(Path(out_dir) / "result.json", record)
    return record


def _run(cfg, out_dir: Path) -> dict:
    t0 = time.time()
    check_run(cfg)
    seed_everything(int(cfg.seed))
    device = pick_device(cfg.device)
    task = tasks.build(cfg.task)
    check_generation_task(task)
    check_trainer(cfg.trainer)
    loaded = models.load(cfg.model, kind="decoder", seed=int(cfg.seed))
    model, tok = loaded.model.to(device), loaded.tokenizer
    methods.check(cfg.intervention, model)  # bad options fail now, not after the frozen evaluation
    train_records, test_records = task.load(int(cfg.seed))
    encoded = [e for r in train_records
               if (e := encode_example(tok, task.prompt(r), task.target_text(r), cfg.trainer.max_length))]
    if not encoded:
        raise ConfigError(f"no training example of task={task.name} fits trainer.max_length={cfg.trainer.max_length}")
    log.info("task %s: %d train / %d test examples", task.name, len(encoded), len(test_records))

    metrics = {}
    if cfg.eval_frozen:
        metrics["frozen"], _ = evaluate(model, tok, task, test_records, cfg.eval_batch_size, desc="eval frozen")
        log.info("frozen model: accuracy %.3f", metrics["frozen"]["accuracy"])

    wandb_log = _wandb(cfg)
    seed_everything(int(cfg.seed))  # the method's initialisation does not depend on eval_frozen
    method = methods.build(cfg.intervention, model).to(device)
    params = method.param_counts()
    log.info("method %s: %d trainable parameters (%.4f%%)", cfg.intervention.name, params["trainable"], params["percent"])
    stats = train(model, method, encoded, cfg.trainer, tok.pad_token_id, int(cfg.seed), log=wandb_log)
    metrics["trained"], outputs = evaluate(model, tok, task, test_records, cfg.eval_batch_size, method=method,
                                           desc="eval trained")
    if cfg.save_intervention:
        method.save(out_dir / "intervention")
    if task.metric == "alpaca_eval":  # open-ended answers are judged offline by `alpaca_eval`
        path = tasks.write_alpaca_eval(out_dir / "alpaca_eval_outputs.json", test_records, outputs,
                                       generator=f"{cfg.model.name}-{cfg.intervention.name}-seed{cfg.seed}")
        metrics["trained"] = {"alpaca_eval_outputs": str(path), "n": len(outputs)}

    record = {
        "method": cfg.intervention.name,
        "task": task.name,
        "task_version": task.version,
        "model": cfg.model.name,
        "seed": int(cfg.seed),
        "metrics": metrics,
        "params": params,
        "train": stats,
        "wall_seconds": time.time() - t0,
        "memory": None,  # filled in by run() once the whole run is measured
        "samples": [{"prompt": task.prompt(r), "answer": r.get("answer"), "output": o}
                    for r, o in list(zip(test_records, outputs))[:5]],
        "config": OmegaConf.to_container(cfg, resolve=True),
        "overrides": None,
        "command": command_line(),
        "versions": versions(),
        "git_commit": git_commit(),
    }
    if wandb_log:
        import wandb
        wandb.log({f"eval/{k}_accuracy": v["accuracy"] for k, v in metrics.items()})
        wandb.finish()
    return record


def _wandb(cfg):
    if not cfg.wandb.enabled:
        return None
    import wandb
    wandb.init(project=cfg.wandb.project, mode=cfg.wandb.mode, config=OmegaConf.to_container(cfg, resolve=True))
    return lambda data, step: wandb.log(data, step=step)


def summary(record: dict) -> str:
    m = record["metrics"]
    if "accuracy" in m["trained"]:
        frozen = f"frozen {m['frozen']['accuracy']:.3f} -> " if "frozen" in m else ""
        score = f"{frozen}trained {m['trained']['accuracy']:.3f} accuracy on {m['trained']['n']} examples"
    else:
        score = f"{m['trained']['n']} answers for alpaca_eval in {m['trained']['alpaca_eval_outputs']}"
    p = record["params"]
    return (f"{record['method']} on {record['task']} ({record['model']}, seed {record['seed']}): {score} | "
            f"{p['trainable']:,} trainable params ({p['percent']:.4f}%) | {record['train']['steps']} steps | "
            f"{record['wall_seconds']:.0f}s | peak RSS {record['memory']['cpu_peak_rss_gib']:.2f} GiB")
