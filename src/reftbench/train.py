"""The training loop, on `accelerate.Accelerator`. It sees a method only through the shared interface.

One code path for one CPU, one GPU and several processes (DDP or FSDP under `accelerate launch` or
`torchrun`): mixed precision from `trainer.precision`, gradient accumulation that never spans two
epochs, clipping through the accelerator, and resumable checkpoints (see `checkpoint.py`).
"""
import logging
import math
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from . import checkpoint, precision, preempt
from .data import to_device
from .errors import ConfigError
from .architectures import backbone

log = logging.getLogger("reftbench")


def answer_loss(model, batch) -> torch.Tensor:
    """Cross-entropy on answer tokens, with the LM head applied to those positions only.

    The full [B, T, V] logits (a fifth of a small model's compute, and most of its activation
    memory) are never built: only the hidden states that predict a label reach the head.
    """
    hidden = backbone(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2 (overwritten only when they come straight from the head, whose output nothing keeps)
        logits = torch.tanh(logits / cap) * cap
    return LeanCrossEntropy.apply(logits.float(), labels[keep], not cap)[0]


class LeanCrossEntropy(torch.autograd.Function):
    """F.cross_entropy (mean over rows) that keeps one [rows, vocab] tensor instead of three.

    Forward writes the log-probabilities over the logits (with `overwrite`: the caller's logits are
    used by nothing else), backward writes the gradient over the log-probabilities; both run
    autograd's own kernels (log_softmax, nll_loss and log_softmax backward) on a few rows at a time,
    so loss and gradient are F.cross_entropy's bit for bit (every kernel is row-wise). On SmolLM2 at
    8 × 16 answer tokens that is 25 MB less at the end of the forward and 50 MB less at the start of
    the backward. The graph can be backpropagated once (the saved log-probabilities are consumed)."""

    ROWS = 8

    @staticmethod
    def forward(ctx, logits, labels, overwrite=False):
        ctx.set_materialize_grads(False)
        if overwrite:
            for i in range(0, len(labels), LeanCrossEntropy.ROWS):
                rows = logits[i:i + LeanCrossEntropy.ROWS]
                rows.copy_(torch.log_softmax(rows, -1))
            logp = logits
            ctx.mark_dirty(logits)
        else:
            logp = torch.log_softmax(logits, -1)
        ctx.save_for_backward(logp, labels)
        return F.nll_loss(logp, labels), logp

    @staticmethod
    def backward(ctx, grad, _):
        logp, labels = ctx.saved_tensors
        if grad is None:
            return None, None, None
        total = torch.tensor(float(len(labels)), dtype=logp.dtype, device=logp.device)
        for i in range(0, len(labels), LeanCrossEntropy.ROWS):
            rows = logp[i:i + LeanCrossEntropy.ROWS]
            g = torch.ops.aten.nll_loss_backward(grad, rows, labels[i:i + LeanCrossEntropy.ROWS], None, 1, -100, total)
            rows.copy_(torch.ops.aten._log_softmax_backward_data(g, rows, 1, rows.dtype))
        return logp, None, None


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def check_trainer(cfg):
    for k in ("batch_size", "grad_accum", "max_length"):
        if not _positive(cfg[k]):
            raise ConfigError(f"trainer.{k}={cfg[k]} must be a positive number")
    if cfg.get("lr") is not None and not _positive(cfg.lr):
        raise ConfigError(f"trainer.lr={cfg.lr} must be a positive number (or null: the method's own intervention.lr)")
    if cfg.epochs is not None and cfg.epochs <= 0 and not cfg.max_steps:
        raise ConfigError(f"trainer.epochs={cfg.epochs} must be positive (or set trainer.max_steps)")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ConfigError(f"trainer.warmup_ratio={cfg.warmup_ratio} must be in [0, 1)")
    if cfg.weight_decay < 0:
        raise ConfigError(f"trainer.weight_decay={cfg.weight_decay} must be >= 0")
    if cfg.get("precision", "auto") not in precision.POLICIES:
        raise ConfigError(f"trainer.precision={cfg.precision!r} is unknown: use {', '.join(precision.POLICIES)}")
    every = cfg.get("save_every")
    if every is not None and not (isinstance(every, int) and not isinstance(every, bool) and every > 0):
        raise ConfigError(f"trainer.save_every={every} must be a positive number of optimiser steps (or null)")


def effective_lr(cfg, method_config) -> float:
    """The one learning rate a run trains at: `trainer.lr` when set (so a sweep over it moves every
    method), else the method's own recommended `intervention.lr`."""
    lr = cfg.get("lr")
    if lr is None:
        lr = method_config.lr
    if lr is None:
        raise ConfigError("no learning rate: set trainer.lr (or the method's intervention.lr)")
    return float(lr)


def _groups(groups: list[dict]) -> list[dict]:
    """A method's parameter groups with each tensor in the first group that names it, empty groups dropped."""
    seen, out = set(), []
    for g in groups:
        params = [p for p in g["params"] if id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            out.append(dict(g, params=params))
    return out


def make_accelerator(policy: str, device: str = "auto"):
    """The run's Accelerator. `device`: auto (the GPU when one is visible), cpu, cuda or cuda:N; under
    a distributed launch each process takes the device the launcher gave it."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs
    if device != "cpu" and device != "auto" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but no CUDA device is visible: use device=auto or device=cpu")
    if device.startswith("cuda:") and PartialState().num_processes == 1:
        torch.cuda.set_device(torch.device(device))
    # A run may follow another in this process (a sweep, the tests) with another precision: accelerate
    # keeps its precision process-wide, so forget it (the process group, in PartialState, stays).
    AcceleratorState._reset_state()
    # the loop calls no_sync itself and steps its scheduler once per optimiser step
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())  # (a CPU-only DDP run needs it)
    if cpu and policy == "fp16-mixed":
        raise ConfigError("trainer.precision=fp16-mixed needs a GPU (loss scaling): use bf16-mixed on the CPU")
    return Accelerator(cpu=cpu, mixed_precision=precision.ACCELERATE[policy],
                       step_scheduler_with_optimizer=False,
                       # no buffer changes in training (rotary tables, position ids, LoReFT's constant
                       # bases): DDP's default re-broadcast of them on every forward is pure traffic
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False,
                                                                      broadcast_buffers=False)])


def policy_of(accelerator) -> str:
    return {v: k for k, v in precision.ACCELERATE.items()}[accelerator.mixed_precision]


class Step(nn.Module):
    """The one module DDP/FSDP wrap: model and method together, forward = one micro-batch's loss
    (the task loss plus the method's own term). Wrapping both lets DDP see every trainable tensor,
    the method's own modules (ReFT interventions) included."""

    def __init__(self, model, method, loss_fn):
        super().__init__()
        self.model, self.method, self.loss_fn = model, method, loss_fn

    def forward(self, batch):
        loss = self.loss_fn(self.model, batch)
        term = self.method.loss_term()
        return loss if term is None else loss + term


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The global micro-batches of one epoch: a shuffle that depends on (seed, epoch) only, so a
    resumed run and every process see the same order without sharing any state."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def shard(batch: list[int], rank: int, world: int, order: list[int]) -> list[int]:
    """This process's equal share of a global micro-batch; a short last batch is completed from the
    epoch's start (as accelerate's even_batches) so no process idles and DDP's average is fair."""
    if len(batch) % world:
        batch = batch + order[:world - len(batch) % world]
    k = len(batch) // world
    return batch[rank * k:(rank + 1) * k]


def loss_items(example: dict) -> int:
    """How many terms an example adds to its micro-batch's mean loss: its answer tokens for a causal LM
    (labels shifted by one, as answer_loss), one for a classifier (a `label`, no `labels`)."""
    labels = example.get("labels")
    return 1 if labels is None else sum(1 for t in labels[1:] if t != -100)


def shard_weight(shard_items: int, global_items: int, world: int) -> float:
    """DDP averages the processes' gradients; scaling each process's mean loss by this makes that average
    the gradient of the mean over the whole global micro-batch, as one process computes it. A term that
    is the same on every process (a regulariser) keeps its gradient: the weights average to one."""
    return world * shard_items / global_items if global_items else 1.0


def set_mode(model, method, training: bool, base_dropout: bool = True, checkpointing: bool = False):
    """Training: the base model in train mode when base_dropout (pyreft's way: RoBERTa's dropout and the
    classifier's are on), else in eval mode; the method's own modules in train mode either way.
    Evaluation: everything in eval mode."""
    model.train(training and base_dropout)
    if training and checkpointing and not base_dropout:
        for m in model.modules():  # HF recomputes a layer only in training mode: flip those flags alone,
            if getattr(m, "gradient_checkpointing", False):  # their dropouts stay off
                m.training = True
    method.train(training)


def train(model, method, examples: list, cfg, collate, loss_fn=answer_loss, seed: int = 0, log_fn=None,
          extra_params=(), on_epoch_end=None, accelerator=None, checkpoint_dir=None, fingerprint=None,
          resume: bool = True) -> dict:
    """cfg: the `trainer` config group. `extra_params` train beside the method's (a classification
    head); `on_epoch_end(epoch)` runs after each pass over the data (model selection; if it has
    state_dict/load_state_dict, its state goes into the checkpoints). `checkpoint_dir`: where to
    write resumable checkpoints and, when `resume`, look for one of this same `fingerprint` (the run's
    config) to resume from (None: no checkpoints)."""
    check_trainer(cfg)
    acc = accelerator or make_accelerator(
        precision.resolve(cfg.get("precision", "auto"), str(model.dtype).removeprefix("torch.")),
        "cpu" if next(model.parameters()).device.type == "cpu" else "auto")
    policy = policy_of(acc)
    lr = effective_lr(cfg, method.config)
    head = list(extra_params)
    for p in head:
        p.requires_grad_(True)
    own = method.trainable_parameters()
    precision.upcast_trainable(own + head, policy, model)
    params = list({id(p): p for p in own + head}.values())
    base_dropout, ckpt_grad = bool(cfg.get("base_dropout", True)), bool(cfg.get("gradient_checkpointing", False))
    world, rank = acc.num_processes, acc.process_index
    if cfg.batch_size % world:
        raise ConfigError(f"trainer.batch_size={cfg.batch_size} is the global batch and must split evenly over "
                          f"{world} processes")
    n_batches = math.ceil(len(examples) / cfg.batch_size)
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)  # the last group of an epoch may be short
    total = int(cfg.max_steps) if cfg.max_steps else int(math.ceil(cfg.epochs * steps_per_epoch))
    warmup = int(cfg.warmup_ratio * total)
    groups = _groups(method.param_groups(lr, float(cfg.weight_decay), head))
    if {id(p) for g in groups for p in g["params"]} != {id(p) for p in params}:
        raise RuntimeError(f"{type(method).__name__}.param_groups() must hold exactly its trainable parameters "
                           "and the head's")
    stats = {"lr": lr, "precision": policy, "param_dtypes": precision.dtypes({"method": own, "head": head}),
             "param_groups": [{k: v for k, v in g.items() if k != "params"} | {"tensors": len(g["params"])}
                              for g in groups],
             "weight_decay": {g["name"]: g["weight_decay"] for g in groups},
             "processes": world, "global_batch": cfg.batch_size * cfg.grad_accum, "total_steps": total,
             "warmup_steps": warmup, "resumed_from_step": None}
    if not params:  # nothing to train (intervention=none on a generation task): the frozen model
        return {"steps": 0, "epochs": 0, "train_seconds": 0.0, "final_loss": None, **stats}

    if ckpt_grad:  # non-reentrant: works with frozen inputs and under DDP
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    step_module = Step(model, method, loss_fn)
    prepared = acc.prepare(step_module)
    if acc.distributed_type == "FSDP":  # FSDP replaced the tensors: train what it holds (full finetuning)
        params = [p for p in prepared.parameters() if p.requires_grad]
        groups = [dict(groups[0], params=params)]
    opt = torch.optim.AdamW(groups, lr=lr)
    sched = get_linear_schedule_with_warmup(opt, warmup, total)
    opt, sched = acc.prepare(opt, sched)
    on = cfg.get("checkpoints", True)
    saver = checkpoint.Saver(acc, step_module, checkpoint_dir if on else None, fingerprint, on_epoch_end, resume)
    state = {"step": 0, "epoch": 0, "batch": 0, "losses": []}
    resumed = saver.resume(state)
    if resumed is not None:
        stats["resumed_from_step"] = resumed
        log.info("resumed from the checkpoint at optimiser step %d (epoch %d, batch %d)", resumed,
                 state["epoch"], state["batch"])

    log.info("training: %d optimiser steps from step %d", total, state["step"])
    try:
        with preempt.stop_on_signals() as stop:
            _loop(model, method, examples, cfg, collate, seed, log_fn, on_epoch_end, acc, prepared, opt, sched,
                  saver, params, state, total, base_dropout, ckpt_grad, stop, stats)
    finally:
        saver.close()
    acc.free_memory()  # the accelerator lets go of the wrapped model and optimiser (a sweep's next run)
    set_mode(model, method, False)
    if ckpt_grad:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    losses = state["losses"]
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": state["step"], "epochs": state["epoch"], "train_seconds": stats.pop("_seconds"),
            "final_loss": sum(tail) / len(tail) if tail else None, **stats}


def _loop(model, method, examples, cfg, collate, seed, log_fn, on_epoch_end, acc, prepared, opt, sched, saver,
          params, state, total, base_dropout, ckpt_grad, stop, stats):
    world, rank = acc.num_processes, acc.process_index
    t0 = time.time()
    bar = tqdm(total=total, initial=state["step"], desc="train", unit="step", leave=False, dynamic_ncols=True,
               disable=None if acc.is_main_process else True)
    set_mode(model, method, True, base_dropout, ckpt_grad)
    losses = state["losses"]
    items = [loss_items(e) for e in examples] if world > 1 else None  # each example's loss terms, counted once
    while state["step"] < total:
        batches = epoch_batches(len(examples), cfg.batch_size, seed, state["epoch"])
        order = [i for b in batches for i in b]
        for i in range(state["batch"], len(batches)):
            start = i - i % cfg.grad_accum
            size = min(cfg.grad_accum, len(batches) - start)  # micro-batches in this optimiser step
            sync = i + 1 == start + size
            ids_ = shard(batches[i], rank, world, order) if world > 1 else batches[i]
            batch = to_device(collate([examples[j] for j in ids_]), acc.device)
            weight = 1.0 if world == 1 else shard_weight(
                sum(items[j] for j in ids_),
                sum(items[j] for r in range(world) for j in shard(batches[i], r, world, order)), world)
            # The method's context stays open across backward: a checkpointed layer recomputed during
            # backward then intervenes at this batch's positions too.
            with (nullcontext() if sync else acc.no_sync(prepared)), method.context(batch):
                loss = prepared(batch)
                acc.backward(loss * weight / size)
            losses.append(loss.item())
            state["batch"] = i + 1
            if not sync:
                continue
            if cfg.max_grad_norm:
                acc.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            recent = sum(losses[-size:]) / size
            bar.set_postfix(loss=f"{recent:.3f}")
            bar.update(1)
            if log_fn and acc.is_main_process:
                log_fn({"train/loss": recent, "train/lr": sched.get_last_lr()[0]}, state["step"])
            if state["step"] >= total:
                break
            signum = preempt.agreed(stop, acc)
            if signum:  # the cluster's warning: save where we are, then stop (or let submitit requeue)
                saver.save(state)
                bar.close()
                log.warning("stopped at optimiser step %d of %d%s", state["step"], total,
                            f"; checkpoint in {saver.root}" if saver.root else "")
                preempt.hand_over(stop, signum, state["step"], saver.root is not None)
            if cfg.get("save_every") and state["step"] % cfg.save_every == 0 and state["batch"] < len(batches):
                saver.save(state)
        state["epoch"] += 1
        state["batch"] = 0
        if on_epoch_end:
            set_mode(model, method, False)
            with acc.autocast():
                on_epoch_end(state["epoch"])
            set_mode(model, method, True, base_dropout, ckpt_grad)
        saver.save(state)
    bar.close()
    stats["_seconds"] = time.time() - t0
