"""What training optimises and evaluation measures, per kind of task.

`generation` (commonsense, arithmetic, instruction): a decoder learns the target text after the
prompt; evaluation generates and applies the task's answer check.
`classification` (GLUE): an encoder with a classification head; the head trains (not counted as
the method's parameters); evaluation predicts labels and computes the task's GLUE metric.
The runner picks one by `task.kind` and otherwise treats them alike.
"""
import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed
from .data import Examples, collate_classification, collate_train, encode_example, encode_pair, encode_whole, to_device
from .methods.base import active
from .evaluate import evaluate as evaluate_generation
from .train import answer_loss

log = logging.getLogger("reftbench")


@torch.no_grad()
def mean_loss(objective, model, examples, batch_size, method=None) -> float:
    """Mean loss over examples (per batch), the way training computes it; for held-out splits."""
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = to_device(objective.collate(chunk), device)
        with active(method, batch):
            total += objective.loss(model, batch).item() * len(chunk)
        n += len(chunk)
    return total / n


def count_lengths(examples: list[dict], n_records: int, max_length: int, stats: dict | None) -> list[dict]:
    """Say how many training examples did not fit max_length: a silent cut changes what is learnt."""
    dropped, truncated = n_records - len(examples), sum(bool(e.get("truncated")) for e in examples)
    if stats is not None:
        stats.update(train_records=n_records, train_dropped_too_long=dropped, train_truncated=truncated,
                     max_length=max_length)
        if dropped or truncated:
            log.warning("trainer.max_length=%d: %d of %d training examples dropped (the prompt alone fills it), "
                        "%d truncated", max_length, dropped, n_records, truncated)
    return examples


class Generation:
    model_kind = "decoder"

    def __init__(self, task, tokenizer, max_length: int):
        self.task, self.tok, self.max_length = task, tokenizer, max_length
        # The untouched model can answer: score it on the same examples, unless a judge scores the
        # answers offline (AlpacaEval), where a frozen pass would cost a full generation for no number.
        self.frozen_baseline = not task.judged_offline

    def encode(self, records, stats: dict | None = None):
        """Training examples. One longer than max_length is truncated (as pyreft does); one whose
        prompt alone fills max_length has no answer token left to learn and is dropped. `stats`
        receives both counts."""
        if self.task.loss_on_prompt:  # task.protocol=llm_adapters
            kept = (encode_whole(self.tok, self.task.train_text(r), self.task.train_prompt(r), self.max_length)
                    for r in records)
        else:
            kept = (e for r in records
                    if (e := encode_example(self.tok, self.task.prompt(r), self.task.target_text(r), self.max_length)))
        return count_lengths(Examples.build(kept), len(records), self.max_length, stats)

    def collate(self, examples):
        return collate_train(examples, self.tok.pad_token_id)

    loss = staticmethod(answer_loss)

    def head_parameters(self, model):
        return []

    def evaluate(self, model, records, batch_size, method=None, desc="eval"):
        metrics, outputs = evaluate_generation(model, self.tok, self.task, records, batch_size, method=method, desc=desc)
        if "accuracy" in metrics:
            metrics["score"] = metrics["accuracy"]
        return metrics, outputs

    def sample(self, record, output):
        return {"prompt": self.task.prompt(record), "answer": record.get("answer"), "output": output}


class Classification:
    model_kind = "encoder"
    # An encoder with a fresh head scores at chance; the fair frozen baseline is a linear probe:
    # `intervention=none` trains the head alone.
    frozen_baseline = False

    def __init__(self, task, tokenizer, max_length: int):
        self.task, self.tok, self.max_length = task, tokenizer, max_length
        self.regression = task.num_labels == 1

    def encode(self, records, stats: dict | None = None):
        """Inputs longer than max_length are truncated (none is dropped); `stats` receives the count."""
        return count_lengths(Examples.build(encode_pair(self.tok, r, self.max_length) for r in records), len(records),
                             self.max_length, stats)

    def collate(self, examples):
        return collate_classification(examples, self.tok.pad_token_id, regression=self.regression)

    def loss(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if self.regression:
            return F.mse_loss(logits.squeeze(-1).float(), batch["labels"])
        return F.cross_entropy(logits.float(), batch["labels"])

    def head_parameters(self, model):
        """Everything after the encoder layers. RoBERTa's head is dense+tanh+projection; BERT
        splits the same thing into its pooler (dense+tanh on [CLS]) and classifier, so both train."""
        from .architectures import backbone
        parts = [getattr(model, "classifier", None) or getattr(model, "score", None),
                 getattr(backbone(model), "pooler", None)]
        return [p for part in parts if part is not None for p in part.parameters()]

    @torch.inference_mode()
    def evaluate(self, model, records, batch_size, method=None, desc="eval"):
        from .tasks import glue_metrics
        device = next(model.parameters()).device
        examples = self.encode(records)
        preds = {}
        for start in tqdm(distributed.my_batches(len(examples), batch_size), desc=desc, unit="batch", leave=False,
                          disable=None):  # under DDP, every world-th batch
            batch = self.collate(examples[start:start + batch_size])
            batch = to_device(batch, device)
            with active(method, batch):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            preds[start] = (logits.squeeze(-1) if self.regression else logits.argmax(-1)).tolist()
        preds = [p for chunk in distributed.gather(preds, range(0, len(examples), batch_size)) for p in chunk]
        labels = [r["label"] for r in records]
        glue_task = self.task.options.get("glue_task", self.task.name)
        metrics = glue_metrics(glue_task, preds, labels)
        metrics.update(score=metrics[self.task.metric], n=len(records))
        metrics["per_example"] = self.per_example(records, preds, labels, glue_task)
        return metrics, [str(p) for p in preds]

    def per_example(self, records, preds, labels, glue_task) -> dict:
        """Predictions and labels (the metric can be recomputed on a resample: MCC, Pearson are not
        means over examples), compact strings as in evaluate.per_example; 0/1 correctness when the
        headline metric is accuracy."""
        from .evaluate import example_id
        fmt = (lambda x: f"{x:.6g}") if self.regression else str
        out = {"ids": " ".join(example_id(r) for r in records), "glue_task": glue_task, "metric": self.task.metric,
               "prediction": " ".join(fmt(p) for p in preds), "label": " ".join(fmt(x) for x in labels)}
        if self.task.metric == "accuracy":
            out["correct"] = "".join("1" if p == x else "0" for p, x in zip(preds, labels))
        return out

    def sample(self, record, output):
        return {"text": record["text"], "text_pair": record.get("text_pair"), "label": record["label"],
                "prediction": output}


OBJECTIVES = {"generation": Generation, "classification": Classification}
