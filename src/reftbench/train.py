"""The training loop. It sees a method only through the shared interface."""
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .data import to_device
from .errors import ConfigError
from .models import backbone


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
    if cap:  # Gemma 2
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits.float(), labels[keep])


def check_trainer(cfg):
    for k in ("lr", "batch_size", "grad_accum", "max_length"):
        if not (isinstance(cfg[k], (int, float)) and cfg[k] > 0):
            raise ConfigError(f"trainer.{k}={cfg[k]} must be a positive number")
    if cfg.epochs is not None and cfg.epochs <= 0 and not cfg.max_steps:
        raise ConfigError(f"trainer.epochs={cfg.epochs} must be positive (or set trainer.max_steps)")
    if not 0 <= cfg.warmup_ratio < 1:
        raise ConfigError(f"trainer.warmup_ratio={cfg.warmup_ratio} must be in [0, 1)")
    if cfg.weight_decay < 0:
        raise ConfigError(f"trainer.weight_decay={cfg.weight_decay} must be >= 0")


def train(model, method, examples: list, cfg, collate, loss_fn=answer_loss, seed: int = 0, log=None,
          extra_params=(), on_epoch_end=None) -> dict:
    """cfg: the `trainer` config group. `extra_params` train beside the method's (a classification
    head); `on_epoch_end(epoch)` runs after each pass over the data (model selection)."""
    check_trainer(cfg)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(examples, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                                         collate_fn=collate, drop_last=False)
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total = int(cfg.max_steps) if cfg.max_steps else int(math.ceil(cfg.epochs * steps_per_epoch))
    extra = list(extra_params)
    for p in extra:
        p.requires_grad_(True)
    params = list({id(p): p for p in method.trainable_parameters() + extra}.values())
    step, micro, epoch, losses, t0 = 0, 0, 0, [], time.time()
    if not params:  # nothing to train (intervention=none on a generation task): the frozen model
        return {"steps": 0, "train_seconds": 0.0, "final_loss": None}
    lr = method.config.lr or cfg.lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, int(cfg.warmup_ratio * total), total)
    method.train()
    bar = tqdm(total=total, desc="train", unit="step", leave=False, dynamic_ncols=True, disable=None)
    while step < total:
        for batch in loader:
            batch = to_device(batch, device)
            with method.context(batch):
                loss = loss_fn(model, batch)
                term = method.loss_term()
            if term is not None:  # the method's own objective (a regulariser), added blind to which method
                loss = loss + term
            (loss / cfg.grad_accum).backward()
            losses.append(loss.item())
            micro += 1
            if micro % cfg.grad_accum:
                continue
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            recent = sum(losses[-cfg.grad_accum:]) / cfg.grad_accum
            bar.set_postfix(loss=f"{recent:.3f}")
            bar.update(1)
            if log:
                log({"train/loss": recent, "train/lr": sched.get_last_lr()[0]}, step)
            if step >= total:
                break
        epoch += 1
        if on_epoch_end:
            method.eval()
            on_epoch_end(epoch)
            method.train()
    bar.close()
    method.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": step, "epochs": epoch, "train_seconds": time.time() - t0, "final_loss": sum(tail) / len(tail)}
