"""Resumable checkpoints: `<run dir>/checkpoints/step-NNNNNNNNN/`.

accelerate's save_state/load_state hold the trained tensors (only those: the frozen base model is
never copied), the optimiser, the scheduler, the loss scaler, every process's RNG states and the
registered objects (model selection's best state); `trainer_state.json` adds what they do not: the
optimiser step, the epoch, the micro-batches done in it (the data order is a function of seed and
epoch, so that is the position in the data), the losses so far, and the fingerprint of the training
config it belongs to (`fingerprint`: only what changes training, so a resubmitted job with another
eval_batch_size, wandb setting, device or launcher still resumes; a changed one is refused).

A checkpoint is written under `incomplete/` and renamed into place only once every process has
written its part, so a save killed half-way never looks like a checkpoint; older ones are removed
after the rename, so one complete checkpoint always exists.
"""
import json
import logging
import os
import shutil
from pathlib import Path

from omegaconf import OmegaConf

from .errors import ConfigError
from .record import write_json_atomic

log = logging.getLogger("reftbench")
STATE = "trainer_state.json"
# The config groups that change training, and within them the keys that do not (where the weights
# or data live, how often to checkpoint, how to generate at test time).
TRAINING_GROUPS = ("model", "task", "intervention", "trainer", "seed")
NOT_TRAINING = {"model": ("path",), "task": ("data_dir", "hub", "max_new_tokens", "generation"),
                "trainer": ("checkpoints", "save_every", "keep_checkpoints")}


def fingerprint(cfg) -> dict:
    """The part of a run's config that changes its training: model, task data, method, trainer
    (precision included) and seed. A checkpoint resumes only under the same fingerprint."""
    full = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    out = {}
    for group in TRAINING_GROUPS:
        value = full.get(group)
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in NOT_TRAINING.get(group, ())}
        out[group] = value
    return out


def _flat(value, prefix="") -> dict:
    if isinstance(value, dict) and value:
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def differing_keys(saved, now) -> list[str]:
    """Dotted keys whose values differ between two fingerprints (a key only one has counts)."""
    a, b = _flat(saved or {}), _flat(now or {})
    return sorted(k for k in a.keys() | b.keys() if a.get(k, KeyError) != b.get(k, KeyError))


def latest(root) -> Path | None:
    """The newest complete checkpoint under root, or None."""
    root = Path(root)
    done = sorted(p for p in root.glob("step-*") if (p / STATE).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def remove(root) -> None:
    shutil.rmtree(root, ignore_errors=True)


class Saver:
    def __init__(self, accelerator, step_module, root, fingerprint, extra=None, resume: bool = True):
        self.acc, self.fingerprint, self.allow_resume = accelerator, fingerprint, resume
        self.root = Path(root) if root is not None else None
        self.handles = []
        if self.root is None:
            return
        # the trained tensors and the method's own buffers; the frozen model stays out of the checkpoint
        # (persistent buffers only: a non-persistent one is a constant the method rebuilds from the seed)
        params = dict(step_module.named_parameters())
        self.keep = {n for n, p in params.items() if p.requires_grad}
        self.keep |= {n for n in step_module.state_dict(keep_vars=True) if n.startswith("method.") and n not in params}
        self.handles.append(accelerator.register_save_state_pre_hook(self._only_trained))
        if extra is not None and hasattr(extra, "state_dict") and hasattr(extra, "load_state_dict"):
            accelerator.register_for_checkpointing(extra)

    def _only_trained(self, models, weights, output_dir):
        for w in weights:
            for k in [k for k in w if k.removeprefix("module.") not in self.keep]:
                del w[k]

    def resume(self, state: dict) -> int | None:
        """Load the newest checkpoint of this same config into the accelerator and `state`; returns
        the optimiser step it resumed from, or None (nothing to resume: a fresh start)."""
        if self.root is None:
            return None
        path = latest(self.root)
        if path is None:
            return None
        saved = json.loads((path / STATE).read_text())
        if self.allow_resume:  # a checkpoint of another training config is refused, never deleted
            before = saved.get("fingerprint")
            if isinstance(before, dict) and "eval_batch_size" in before:  # older checkpoints: the whole config
                before = fingerprint(before)
            changed = differing_keys(before, self.fingerprint)
            if changed:
                shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
                raise ConfigError(f"{path} was written with other training settings ({shown}): rerun with its "
                                  "values to resume, or with resume=false to delete it and start afresh")
            if saved.get("processes") != self.acc.num_processes:
                raise ConfigError(f"{path} was written by {saved.get('processes')} processes, this run has "
                                  f"{self.acc.num_processes}: launch as many to resume, or resume=false to start afresh")
        else:
            self.acc.wait_for_everyone()
            if self.acc.is_main_process:
                remove(self.root)
            self.acc.wait_for_everyone()
            return None
        self._check_complete(path)
        try:  # strict=False: the frozen model is not in the file, and _check_complete covered the rest
            self.acc.load_state(str(path), strict=False)
        except (ValueError, RuntimeError, KeyError) as e:  # torch: an optimiser group of another size
            raise ConfigError(f"{path} does not fit this run's optimiser: {str(e).splitlines()[0]}") from None
        for k in ("step", "epoch", "batch", "losses"):
            state[k] = saved[k]
        return int(saved["step"])

    def _check_complete(self, path: Path) -> None:
        """Every trained tensor of this run is in the checkpoint and nothing else, and the optimiser and
        scheduler states are there: a tensor left at its initial value beside restored optimiser
        moments would train on silently."""
        from safetensors import safe_open
        if self.acc.distributed_type == "FSDP":  # sharded files of FSDP's own layout
            return
        files = [f for f in ("model.safetensors", "optimizer.bin", "scheduler.bin") if not (path / f).is_file()]
        if files:
            raise ConfigError(f"{path} lacks {', '.join(files)}: it cannot be resumed (resume=false starts afresh)")
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            saved = {k.removeprefix("module.") for k in f.keys()}
        missing, extra = sorted(self.keep - saved), sorted(saved - self.keep)
        if missing or extra:
            what = "; ".join(f"{label} {', '.join(names[:5])}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")
                             for label, names in (("lacks", missing), ("holds untrained", extra)) if names)
            raise ConfigError(f"{path} does not hold this run's trained tensors ({what}): resume=false starts afresh")

    def save(self, state: dict) -> None:
        if self.root is None:
            return
        acc, tmp = self.acc, self.root / "incomplete"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()  # every process has written its RNG states
        if acc.is_main_process:
            write_json_atomic(tmp / STATE, {**{k: state[k] for k in ("step", "epoch", "batch", "losses")},
                                            "processes": acc.num_processes, "fingerprint": self.fingerprint})
            final = self.root / f"step-{state['step']:09d}"
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.root.glob("step-*"):
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def close(self):
        for h in self.handles:
            h.remove()
