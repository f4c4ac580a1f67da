"""Tokenisation and batching, and the compact table that holds tokenised examples.

Training examples are tokenised as pyreft's examples/loreft does: `prompt + answer` as one string,
then EOS; the prompt length (where the labels start and ReFT's positions count) is the length of the
prompt tokenised alone. With a SentencePiece tokenizer (LLaMA) the answer's first token is then the
one the joint text gives, not the one a separate encoding of the answer gives (its leading "▁").
Generation sees the prompt alone; its tokens equal the first tokens of the training input unless the
tokenizer merges the prompt's last characters with the answer's first (e.g. "=" and "5" into "=5"):
then, as in pyreft, the labels start at the prompt's own length and the merged token is not learnt.
"""
from array import array

import numpy as np
import torch


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def encode_prompt(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def encode_example(tokenizer, prompt: str, target: str, max_length: int) -> dict | None:
    """input_ids = tok(prompt + target) + EOS, cut at max_length; labels are -100 over the prompt's own
    length and the ids after it. None when the prompt alone fills max_length (no answer token left)."""
    p = len(encode_prompt(tokenizer, prompt))
    whole = encode_prompt(tokenizer, prompt + target) + [tokenizer.eos_token_id]
    ids = whole[:max_length]
    if p >= len(ids):
        return None
    return {"input_ids": ids, "labels": [-100] * p + ids[p:], "prompt_length": p,
            "truncated": len(whole) > max_length}


def encode_whole(tokenizer, text: str, prompt: str, max_length: int) -> dict:
    """LLM-Adapters finetune.py tokenize(): the whole text tokenised at once and cut at max_length,
    EOS appended when there is room; labels are the input ids (loss on prompt and answer). Never
    dropped: a text cut short still trains on what is left."""
    ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
    if ids[-1] != tokenizer.eos_token_id and len(ids) < max_length:
        ids = ids + [tokenizer.eos_token_id]
    full = len(tokenizer(text)["input_ids"]) if len(ids) >= max_length else 0
    p = len(tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"])
    return {"input_ids": ids, "labels": list(ids), "prompt_length": min(p, len(ids)), "truncated": full > max_length}


def _ids(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.long)


def collate_train(examples, pad_id: int) -> dict:
    """Right padding: every prompt starts at position 0."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[b, :n] = _ids(e["input_ids"])
        labels[b, :n] = _ids(e["labels"])
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "prompt_lengths": [int(e["prompt_length"]) for e in examples],
            "prompt_offsets": [0] * len(examples)}


def collate_prompts(prompts: list[list[int]], pad_id: int) -> dict:
    """Left padding for generation: new tokens line up at the right edge."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        mask[b, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask,
            "prompt_lengths": [len(p) for p in prompts],
            "prompt_offsets": [width - len(p) for p in prompts]}


def encode_pair(tokenizer, record: dict, max_length: int) -> dict:
    """A GLUE example: one text or a pair, truncated to max_length. Positions fN+lM count over
    the whole input, which plays the prompt's part."""
    enc = tokenizer(record["text"], record.get("text_pair"), truncation=True, max_length=max_length)
    at_cap = len(enc["input_ids"]) >= max_length  # only then can it have been cut: measure the whole input
    full = len(tokenizer(record["text"], record.get("text_pair"))["input_ids"]) if at_cap else 0
    return {"input_ids": enc["input_ids"], "label": record["label"], "prompt_length": len(enc["input_ids"]),
            "truncated": full > max_length}


def collate_classification(examples, pad_id: int, regression: bool = False) -> dict:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, : len(e["input_ids"])] = _ids(e["input_ids"])
        mask[b, : len(e["input_ids"])] = 1
    labels = torch.tensor([e["label"] for e in examples], dtype=torch.float if regression else torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "prompt_lengths": [int(e["prompt_length"]) for e in examples], "prompt_offsets": [0] * len(examples)}


class Examples:
    """Tokenised examples held compactly: each list field (input_ids, labels) as one flat int32 array with
    offsets, each number field as one array. Indexing gives a dict of numpy views and plain numbers;
    slicing gives another table. Dicts of Python int lists cost ~50 bytes a token (input_ids and labels:
    pointers and int objects), this ~8 (README, Caches), which matters for commonsense_170k in every
    DDP process."""

    def __init__(self, ragged: dict, offsets: np.ndarray, scalars: dict):
        self.ragged, self.offsets, self.scalars = ragged, offsets, scalars  # offsets: n + 1 entries

    @classmethod
    def build(cls, examples) -> "Examples":
        """From an iterable of dicts (lists or arrays of ids, and numbers), read once and not kept."""
        ragged, scalars, kinds, lengths = {}, {}, {}, array("q", [0])
        for e in examples:
            if not lengths[1:]:  # the first example names the columns
                for k, v in e.items():
                    if isinstance(v, (list, tuple, np.ndarray)):
                        ragged[k] = array("i")
                    else:
                        scalars[k], kinds[k] = array("d"), _dtype(v)
            for k, buf in ragged.items():
                buf.extend(e[k])
            for k, buf in scalars.items():
                buf.append(e[k])
            lengths.append(len(e["input_ids"]))
        offsets = np.cumsum(np.frombuffer(lengths, dtype=np.int64))
        columns = {k: np.frombuffer(buf, dtype=np.int32) for k, buf in ragged.items()}  # no copy: the view keeps it
        numbers = {k: np.frombuffer(buf, dtype=np.float64).astype(kinds[k]) for k, buf in scalars.items()}
        return cls(columns, offsets, numbers)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            idx = range(len(self))[i]
            if idx.step != 1:
                raise IndexError("Examples: only contiguous slices")
            start, stop = idx.start, max(idx.start, idx.stop)
            a, b = self.offsets[start], self.offsets[stop]
            return Examples({k: v[a:b] for k, v in self.ragged.items()}, self.offsets[start:stop + 1] - a,
                            {k: v[start:stop] for k, v in self.scalars.items()})
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        a, b = self.offsets[i], self.offsets[i + 1]
        out = {k: v[a:b] for k, v in self.ragged.items()}
        out.update({k: v[i].item() for k, v in self.scalars.items()})
        return out

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def as_lists(self) -> list[dict]:
        """Plain Python values (for comparisons and JSON)."""
        return [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in e.items()} for e in self]

    def arrays(self) -> dict:
        """Every column by name, and `offsets`: what the cache stores."""
        return {**{f"{k}.values": v for k, v in self.ragged.items()}, "offsets": self.offsets,
                **{k: v for k, v in self.scalars.items()}}

    @classmethod
    def from_arrays(cls, arrays: dict) -> "Examples":
        ragged = {k[: -len(".values")]: v for k, v in arrays.items() if k.endswith(".values")}
        scalars = {k: v for k, v in arrays.items() if k != "offsets" and not k.endswith(".values")}
        return cls(ragged, arrays["offsets"], scalars)


def _dtype(value):
    """Numbers are gathered as float64 (exact for ids, labels and lengths) and kept in their own type."""
    if isinstance(value, (bool, np.bool_)):
        return np.bool_
    return np.int64 if isinstance(value, (int, np.integer)) else np.float64
