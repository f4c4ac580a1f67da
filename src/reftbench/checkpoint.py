"""Resumable checkpoints: `<run dir>/checkpoints/step-NNNNNNNNN/`.

accelerate's save_state/load_state hold the trained tensors (only those: the frozen base model is
never copied), the optimiser, the scheduler, the loss scaler, every process's RNG states and the
registered objects (model selection's best state); `trainer_state.json` adds what they do not: the
optimiser step, the epoch, the micro-batches done in it (the data order is a function of seed and
epoch, so that is the position in the data), the losses so far, and the config it belongs to.

A checkpoint is written under `incomplete/` and renamed into place only once every process has
written its part, so a save killed half-way never looks like a checkpoint; older ones are removed
after the rename, so one complete checkpoint always exists.
"""
import json
import logging
import os
import shutil
from pathlib import Path

from .record import write_json_atomic

log = logging.getLogger("reftbench")
STATE = "trainer_state.json"


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
        self.keep = {n for n, p in step_module.named_parameters() if p.requires_grad}
        self.keep |= {n for n, _ in step_module.named_buffers() if n.startswith("method.")}
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
        if not self.allow_resume or saved.get("fingerprint") != self.fingerprint \
                or saved.get("processes") != self.acc.num_processes:
            if self.allow_resume:
                log.warning("%s belongs to another config (or process count): starting afresh", path)
            self.acc.wait_for_everyone()
            if self.acc.is_main_process:
                remove(self.root)
            self.acc.wait_for_everyone()
            return None
        self.acc.load_state(str(path), strict=False)  # strict=False: only the trained tensors were saved
        for k in ("step", "epoch", "batch", "losses"):
            state[k] = saved[k]
        return int(saved["step"])

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
