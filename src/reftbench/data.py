"""Tokenisation and batching. Prompt and target are tokenised separately, so the prompt a model
sees in training is token for token the prompt it sees at generation."""
import torch


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def encode_prompt(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def encode_example(tokenizer, prompt: str, target: str, max_length: int) -> dict | None:
    """input_ids = prompt + target + EOS; labels cover target + EOS only. None if no target fits."""
    p = encode_prompt(tokenizer, prompt)
    t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (p + t)[:max_length]
    if len(p) >= len(ids):
        return None
    labels = [-100] * len(p) + t
    return {"input_ids": ids, "labels": labels[: len(ids)], "prompt_length": len(p),
            "truncated": len(p) + len(t) > max_length}


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


def collate_train(examples: list[dict], pad_id: int) -> dict:
    """Right padding: every prompt starts at position 0."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[b, :n] = torch.tensor(e["input_ids"])
        labels[b, :n] = torch.tensor(e["labels"])
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "prompt_lengths": [e["prompt_length"] for e in examples],
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


def collate_classification(examples: list[dict], pad_id: int, regression: bool = False) -> dict:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[b, : len(e["input_ids"])] = 1
    labels = torch.tensor([e["label"] for e in examples], dtype=torch.float if regression else torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "prompt_lengths": [e["prompt_length"] for e in examples], "prompt_offsets": [0] * len(examples)}
