"""Batched greedy generation with the KV cache, and scoring with the task's answer check."""
import hashlib
import json

import torch
from tqdm.auto import tqdm

from . import distributed
from .data import collate_prompts, encode_prompt, to_device
from .methods.base import active


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
             method=None, desc: str = "eval", **gen_kwargs) -> list[str]:
    """Greedy outputs for `prompts`, in order. Prompts are grouped by length to waste no
    padding; each sequence stops at EOS. `method=None` runs the model as it is (frozen)."""
    device = next(model.parameters()).device
    settings = {"do_sample": False, "num_beams": 1, **gen_kwargs}  # greedy unless the task says (LLM-Adapters: 4 beams)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    outputs = {}
    for start in tqdm(distributed.my_batches(len(order), batch_size), desc=desc, unit="batch", leave=False,
                      dynamic_ncols=True, disable=None):  # under DDP, every world-th batch
        ids = order[start:start + batch_size]
        batch = to_device(collate_prompts([encoded[i] for i in ids], tokenizer.pad_token_id), device)
        with active(method, per_beam(batch, settings["num_beams"])):
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **settings)
        new = out[:, batch["input_ids"].shape[1]:]
        for i, row in zip(ids, new):
            outputs[i] = tokenizer.decode(row, skip_special_tokens=True)
    return distributed.gather(outputs, range(len(prompts)))


def per_beam(batch: dict, beams: int) -> dict:
    """The batch as beam search runs it: each row repeated once per beam, next to each other (HF
    expands input_ids so), so a method's per-row state (ReFT's positions) covers every beam."""
    if beams == 1:
        return batch
    return {k: v.repeat_interleave(beams, dim=0) if torch.is_tensor(v) else
            [x for x in v for _ in range(beams)] if isinstance(v, list) else v for k, v in batch.items()}


def example_id(record: dict) -> str:
    """A short fingerprint of a test record: two runs pair only when scored on the same ids, in order."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:12]


def per_example(records: list[dict], correct: list[bool]) -> dict:
    """What a paired test needs, kept compact (one line each in result.json): the ids space-separated,
    correctness as a string of 0/1 in test-record order."""
    return {"ids": " ".join(example_id(r) for r in records), "correct": "".join("1" if c else "0" for c in correct)}


def score(task, records: list[dict], outputs: list[str]) -> dict:
    correct = [task.is_correct(o, r) for o, r in zip(outputs, records)]
    return {"accuracy": sum(correct) / max(1, len(correct)), "n": len(correct)}, correct


def evaluate(model, tokenizer, task, records, batch_size, method=None, desc="eval"):
    outputs = generate(model, tokenizer, [task.prompt(r) for r in records], task.max_new_tokens,
                       batch_size, method=method, desc=desc, **task.generation)
    result, correct = score(task, records, outputs)
    if task.eval_tasks:  # one run, several test sets (commonsense, math): a score for each
        result.update(by_sets(task, records, outputs, correct))
    elif not task.judged_offline:
        result["per_example"] = per_example(records, correct)
    return result, outputs


def by_sets(task, records, outputs, correct=None) -> dict:
    """Per-set accuracies and their plain mean, the paper's Avg column (the macro-average), as the
    headline `accuracy`; the micro-average over all examples (dominated by the largest set,
    HellaSwag's 10k of commonsense's 22k) stays beside it as `micro_accuracy`."""
    from .tasks import accuracy_by_eval_task
    sets = accuracy_by_eval_task(task, records, outputs)
    if correct is not None:  # each set's examples, in test-record order, under the set's name
        split = {name: [i for i, r in enumerate(records) if r.get("eval_task", task.name) == name] for name in sets}
        examples = {"by_task": {name: per_example([records[i] for i in mine], [correct[i] for i in mine])
                                for name, mine in split.items()}}
    micro = sum(v["accuracy"] * v["n"] for v in sets.values()) / max(1, sum(v["n"] for v in sets.values()))
    macro = sum(v["accuracy"] for v in sets.values()) / max(1, len(sets))
    out = {"by_task": sets, "accuracy": macro, "micro_accuracy": micro, "average": "macro"}
    return out if correct is None else {**out, "per_example": examples}
