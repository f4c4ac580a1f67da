"""One run, top to bottom: config → model → method → task data → train → evaluate → record."""
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from . import cache, checkpoint, distributed, methods, models, precision, preempt, tasks
from .atomic import atomic_path
from .errors import ConfigError
from .objectives import OBJECTIVES, mean_loss
from .record import PeakRSS, command_line, git_commit, peak_memory, versions, write_json_atomic
from .train import check_trainer, effective_lr, make_accelerator, train

log = logging.getLogger("reftbench")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":  # the GPU when one is visible
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is visible: use device=cpu")
    return dev


def _eval_split(cfg) -> str:
    return cfg.get("eval_split") or "test"  # configs recorded before the key existed


def check_run(cfg) -> None:
    if _eval_split(cfg) not in ("test", "dev"):
        raise ConfigError(f"eval_split={cfg.eval_split!r} is unknown: use test or dev")
    for key in ("seed", "eval_batch_size"):
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
            raise ConfigError(f"{key}={value!r} must be a {'non-negative' if key == 'seed' else 'positive'} integer")


def plan(cfg) -> dict:
    """What a run would do and what it would train, from shipped architecture files on the meta
    device: no weights, no data, nothing written."""
    check_run(cfg)
    task = tasks.build(cfg.task)
    check_trainer(cfg.trainer)
    model = models.build_meta(cfg.model, kind=OBJECTIVES[task.kind].model_kind, num_labels=task.num_labels)
    method = methods.build(cfg.intervention, model)
    return {"model": cfg.model.name, "task": task.name, "method": cfg.intervention.name, "seed": int(cfg.seed),
            "params": method.param_counts(), "table": cfg.get("table"), "row": cfg.get("row")}


def plan_line(p: dict) -> str:
    c = p["params"]
    where = f" [{p['table']}, row {p['row']}]" if p.get("table") and p.get("row") else ""
    parts = "".join(f"; {k} {v:,} ({100 * v / (c['base'] + c.get('added', 0)):.3f}%)" for k, v in c.get("parts", {}).items())
    return (f"dry run: {p['method']} on {p['task']} ({p['model']}, seed {p['seed']}){where}: "
            f"{c['trainable']:,} trainable of {c['base']:,} base params ({c['percent']:.3f}%){parts}")


def finished(cfg, out_dir: Path) -> dict | None:
    """The record already in out_dir when it was written by this same config (an interrupted sweep
    started again in the same folder), else None. Any difference in the config means a new run.
    In a distributed run the first process decides for all (the others' out_dir is not the run's
    folder): a process that skipped alone would leave the rest waiting for it."""
    record = _finished_here(cfg, out_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState
        from accelerate.utils import broadcast_object_list
        state = PartialState(cpu=cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()))
        record = broadcast_object_list([record if state.is_main_process else None])[0]
    return record


def _finished_here(cfg, out_dir: Path) -> dict | None:
    path = Path(out_dir) / "result.json"
    if not cfg.resume or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # written atomically, so this is a foreign file: run again and replace it
    return record if record.get("config") == OmegaConf.to_container(cfg, resolve=True) else None


def run(cfg, out_dir: Path, overrides: list[str] | None = None) -> dict:
    try:
        with PeakRSS() as rss, preempt.stop_on_signals():  # a SIGTERM from here on stops after a step, saved
            record, out_dir, main = _run(cfg, Path(out_dir))
    except BaseException:
        _wandb_failed()  # a run that raises still closes its wandb run, marked failed
        raise
    record["memory"] = peak_memory(pick_device(cfg.device), rss)
    record["overrides"] = list(overrides or [])
    if main:  # one result.json per run: a distributed run's first process writes it
        write_json_atomic(out_dir / "result.json", record)
        if not cfg.trainer.get("keep_checkpoints", False):
            checkpoint.remove(out_dir / "checkpoints")
    return record


def _run(cfg, out_dir: Path) -> dict:
    t0 = time.time()
    check_run(cfg)
    seed_everything(int(cfg.seed))
    task = tasks.build(cfg.task)
    check_trainer(cfg.trainer)
    effective_lr(cfg.trainer, cfg.intervention)  # no learning rate at all: one line now, not after loading
    accelerator = make_accelerator(precision.resolve(cfg.trainer.precision, cfg.model.get("dtype", "float32")),
                                   cfg.device)
    device, main = accelerator.device, accelerator.is_main_process
    if accelerator.num_processes > 1:  # every process works in the first one's run folder
        from accelerate.utils import broadcast_object_list
        out_dir = Path(broadcast_object_list([str(out_dir)])[0])
    kind = OBJECTIVES[task.kind]
    loaded = models.load(cfg.model, kind=kind.model_kind, num_labels=task.num_labels, seed=int(cfg.seed), device=device)
    model, tok = loaded.model, loaded.tokenizer  # already on `device`
    methods.check(cfg.intervention, model)  # bad options fail now, not after the frozen evaluation
    if cfg.get("compress"):
        from .compress import check_compressible
        check_compressible(cfg.intervention.name)
    objective = kind(task, tok, cfg.trainer.max_length)
    splits = task.load_splits(int(cfg.seed))
    data_stats = {"files": task.loaded_files, **tasks.dev_facts(splits, _eval_split(cfg))}  # which files; the dev split
    train_set, tokens_from = cache.tokenised(cfg, objective, splits["train"], data_stats)  # tokenised once: cache.py
    test_records, select = splits[_eval_split(cfg)], splits.get("select")  # eval_split=dev: the test is never scored
    heldout, train_set = train_set[:task.heldout], train_set[task.heldout:]
    if not train_set:
        raise ConfigError(f"no training example of task={task.name} fits trainer.max_length={cfg.trainer.max_length}")
    log.info("task %s: %d train / %d test examples%s", task.name, len(train_set), len(test_records),
             f" / {len(select)} for model selection" if select else "")

    metrics, frozen_from = {}, None
    if cfg.eval_frozen and objective.frozen_baseline:  # once per model and test set: cache.py
        with accelerator.autocast(), distributed.sharded(accelerator):  # as the trained score; DDP: a share each
            metrics["frozen"], frozen_from = cache.frozen_score(cfg, model, objective, test_records, lambda: objective.evaluate(
                model, test_records, cfg.eval_batch_size, desc="eval frozen")[0])
        log.info("frozen model: %s (%s)", _score_text(metrics["frozen"]), frozen_from["from"])
    if heldout:  # open-ended tasks: the answer loss on held-out training examples, computed offline
        with accelerator.autocast():
            metrics.setdefault("frozen", {})["heldout_loss"] = mean_loss(objective, model, heldout, cfg.eval_batch_size)

    wandb_log = _wandb(cfg) if main else None
    seed_everything(int(cfg.seed))  # the method's initialisation does not depend on eval_frozen
    method = methods.build(cfg.intervention, model).to(device)
    params = method.param_counts()
    log.info("method %s: %d trainable parameters (%.4f%%)", cfg.intervention.name, params["trainable"], params["percent"])
    head = objective.head_parameters(model)
    selection = _Selection(objective, model, method, head, select, cfg.eval_batch_size) if select else None
    with distributed.sharded(accelerator):  # model selection runs on every process after each epoch
        stats = train(model, method, train_set, cfg.trainer, objective.collate, objective.loss, int(cfg.seed),
                      log_fn=wandb_log, extra_params=head, on_epoch_end=selection, accelerator=accelerator,
                      checkpoint_dir=out_dir / "checkpoints", fingerprint=checkpoint.fingerprint(cfg),
                      resume=bool(cfg.resume))
    if selection:
        stats.update(selection.restore_best())
    with accelerator.autocast(), distributed.sharded(accelerator) as (_, shared_by):  # in the training precision
        metrics["trained"], outputs = objective.evaluate(model, test_records, cfg.eval_batch_size, method=method,
                                                         desc="eval trained")
    stats["eval_processes"] = shared_by  # how many processes split each evaluation
    if cfg.save_intervention and main:
        method.save(out_dir / "intervention")
        if head:  # the head trained too: keep it beside the intervention, under the model's own names
            from safetensors.torch import save_file
            ids = {id(p) for p in head}
            with atomic_path(out_dir / "intervention" / "head.safetensors") as tmp:
                save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if id(p) in ids}, str(tmp))
    if task.judged_offline and main:  # open-ended answers are judged offline by `alpaca_eval`
        path = tasks.write_alpaca_eval(out_dir / "alpaca_eval_outputs.json", test_records, outputs,
                                       generator=f"{cfg.model.name}-{cfg.intervention.name}-seed{cfg.seed}")
        metrics["trained"] = {"alpaca_eval_outputs": str(path), "n": len(outputs)}
    if heldout:
        with accelerator.autocast():
            metrics["trained"]["heldout_loss"] = mean_loss(objective, model, heldout, cfg.eval_batch_size, method)

    method_report, compressed = method.report(), None
    if cfg.get("compress"):  # fold the gates, drop dead weights, score the checkpoint as saved
        from .compress import after_run
        compressed = after_run(method, tok, out_dir / "compressed", lambda m: objective.evaluate(
            m, test_records, cfg.eval_batch_size, desc="eval compressed")[0],
            timing_batches=(train_set, objective.collate, cfg.eval_batch_size))

    record = {
        "method": cfg.intervention.name,
        "task": task.name,
        "task_version": task.version,
        "metric": task.metric,
        "model": cfg.model.name,
        "seed": int(cfg.seed),
        "metrics": metrics,
        "params": params,
        "method_report": method_report,
        "compressed": compressed,
        "train": stats,
        "data": data_stats,
        "wall_seconds": time.time() - t0,
        "memory": None,  # filled in by run() once the whole run is measured
        "cache": {"frozen_score": frozen_from, "train_tokens": tokens_from},  # computed here, or read from a file
        "samples": [objective.sample(r, o) for r, o in list(zip(test_records, outputs))[:5]],
        "config": OmegaConf.to_container(cfg, resolve=True),
        "overrides": None,
        "command": command_line(),
        "versions": versions(),
        "git_commit": git_commit(),
    }
    if wandb_log:
        _wandb_end(metrics, params)
    return record, out_dir, main


class _Selection:
    """Score the selection split after each epoch; keep and finally restore the best state
    (the paper's GLUE protocol: the checkpoint best on the selection split is tested)."""

    def __init__(self, objective, model, method, head, records, batch_size):
        self.objective, self.model, self.method, self.head = objective, model, method, head
        self.records, self.batch_size = records, batch_size
        self.best, self.best_epoch, self.state = None, None, None

    def __call__(self, epoch):
        metrics, _ = self.objective.evaluate(self.model, self.records, self.batch_size, method=self.method,
                                             desc=f"select {epoch}")
        log.info("epoch %d: selection %s", epoch, _score_text(metrics))
        # A NaN score (Pearson of a constant STS-B prediction) ranks below every number; when every
        # epoch is NaN the first is kept, as HF's Trainer keeps its first best metric.
        score = metrics["score"]
        score = None if score is None or math.isnan(score) else float(score)
        if self.state is None or (score is not None and (self.best is None or score > self.best)):
            self.best, self.best_epoch = score, epoch
            now = (self.method.state_dict(), list(self.head))
            if self.state is None:
                self.state = ({k: v.detach().clone() for k, v in now[0].items()}, [p.detach().clone() for p in now[1]])
            else:  # into the copy already held: never two copies at once (a full finetune's is the model)
                with torch.no_grad():
                    for k, v in now[0].items():
                        self.state[0][k].copy_(v)
                    for kept, p in zip(self.state[1], now[1]):
                        kept.copy_(p)

    def state_dict(self) -> dict:  # the best state so far goes into the run's checkpoints
        return {"best": self.best, "best_epoch": self.best_epoch, "state": self.state}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.state = state["best"], state["best_epoch"], state["state"]

    def restore_best(self) -> dict:
        if self.state is not None:  # restored once; the copy is not needed after that
            method_state, head_state = self.state
            self.method.load_state_dict(method_state)
            with torch.no_grad():
                for p, saved in zip(self.head, head_state):
                    p.copy_(saved)
            self.state = None
        return {"best_epoch": self.best_epoch, "selection_score": self.best}


def _score_text(m: dict) -> str:
    return f"score {m['score']:.3f} on {m['n']} examples" if "score" in m else f"{m.get('n')} outputs"


def _wandb(cfg):
    """Open a wandb run named and grouped by what the run is: the seeds of one table cell share a
    group; the table, row, method, task, model and seed are tags to filter by."""
    if not cfg.wandb.enabled:
        return None
    import wandb
    table, row, method, task, model = cfg.get("table"), cfg.get("row"), cfg.intervention.name, cfg.task.name, cfg.model.name
    label = row or method
    tags = list(dict.fromkeys(str(t) for t in (table, row, method, task, model, f"seed{cfg.seed}") if t))
    wandb.init(project=cfg.wandb.project, mode=cfg.wandb.mode, config=OmegaConf.to_container(cfg, resolve=True),
               name=f"{label}-{task}-{model}-seed{cfg.seed}", group="/".join(str(p) for p in (table, label, task, model) if p),
               tags=tags)
    return lambda data, step: wandb.log(data, step=step)


def _wandb_end(metrics: dict, params: dict) -> None:
    """Scores of the frozen and trained model, per test set where a run has several, and the
    parameter counts; then close the run as a success."""
    import wandb
    data = {}
    for which, m in metrics.items():
        if "score" in m:
            data[f"eval/{which}/score"] = m["score"]
        for name, v in (m.get("by_task") or {}).items():
            score = v.get("score", v.get("accuracy")) if isinstance(v, dict) else v
            if isinstance(score, (int, float)):
                data[f"eval/{which}/{name}/score"] = score
    data.update({f"params/{k}": v for k, v in params.items()})
    wandb.log(data)
    wandb.run.summary.update(data)
    wandb.finish(exit_code=0)


def _wandb_failed() -> None:
    wandb = sys.modules.get("wandb")  # only a run that opened wandb has it imported
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1)


def summary(record: dict) -> str:
    m = record["metrics"]
    if "score" in m["trained"]:
        frozen = f"frozen {m['frozen']['score']:.3f} -> " if "score" in m.get("frozen", {}) else ""
        score = f"{frozen}trained {m['trained']['score']:.3f} {record['metric']} on {m['trained']['n']} examples"
    else:
        score = f"{m['trained']['n']} answers for alpaca_eval in {m['trained']['alpaca_eval_outputs']}"
    p = record["params"]
    return (f"{record['method']} on {record['task']} ({record['model']}, seed {record['seed']}): {score} | "
            f"{p['trainable']:,} trainable params ({p['percent']:.4f}%) | {record['train']['steps']} steps | "
            f"{record['wall_seconds']:.0f}s | peak RSS {record['memory']['cpu_peak_rss_gib']:.2f} GiB")
