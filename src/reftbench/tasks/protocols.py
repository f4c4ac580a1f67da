"""How a task's prompts, loss and answer check are made: `task.protocol`.

`reft` (the default): pyreft examples/loreft, the ReFT paper's own rows. The task YAML's template,
target and answer check; the loss on the answer tokens only.

`llm_adapters`: AGI-Edgerunners/LLM-Adapters, whose runs gave the paper's Table 1/2 LoRA and DoRA
(and other baseline) numbers. finetune.py trains on its Alpaca template with the output in it,
tokenised as one text (cut at cutoff_len, EOS appended where there is room), with the loss on every
token, prompt included (train_on_inputs=True). commonsense_evaluate.py / evaluate.py prompt with a
slightly different template (the whitespace differs, as below), decode with beam search (4 beams),
keep the text after "### Response:" and take the first match of the data set's labels (commonsense)
or the last number / first letter (arithmetic). The per-task parts (labels, beams, lengths) sit in
each task's YAML under `protocols.llm_adapters`.
"""
import logging

from ..errors import ConfigError

log = logging.getLogger("reftbench")

PROTOCOLS = ("reft", "llm_adapters")

# LLM-Adapters finetune.py generate_prompt, character for character: two trailing spaces after
# "request." without input, one with; the continuation lines indented by 16 spaces, blank lines too.
_INDENT = " " * 16
LLM_ADAPTERS_TRAIN = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.  \n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n{_INDENT}\n{_INDENT}### Response:\n{_INDENT}{{output}}")
LLM_ADAPTERS_TRAIN_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n{_INDENT}\n{_INDENT}### Input:\n{_INDENT}{{input}}\n"
    f"{_INDENT}\n{_INDENT}### Response:\n{_INDENT}{{output}}")
# commonsense_evaluate.py and evaluate.py generate_prompt: one trailing space without input, none
# with; blank lines empty; the prompt ends in the 16 spaces before where the output would go.
LLM_ADAPTERS_EVAL = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request. \n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n{_INDENT}### Response:\n{_INDENT}")
LLM_ADAPTERS_EVAL_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    f"{_INDENT}### Instruction:\n{_INDENT}{{instruction}}\n\n{_INDENT}### Input:\n{_INDENT}{{input}}\n\n"
    f"{_INDENT}### Response:\n{_INDENT}")

_COMMON = {
    "llm_adapters": {
        "template": LLM_ADAPTERS_EVAL, "input_template": LLM_ADAPTERS_EVAL_INPUT,
        "train_template": LLM_ADAPTERS_TRAIN, "train_input_template": LLM_ADAPTERS_TRAIN_INPUT,
        "target": "", "loss_on_prompt": True,
        # the evaluators decode the whole sequence and keep what follows the first "### Response:"
        # up to a second one, stripped: on the generated text alone, what comes before one
        "cut_at": "### Response:",
    },
}


def apply(data: dict) -> dict:
    """The task config `data` with its protocol's settings in place (the shared ones, then the
    task's own under `protocols.<name>`)."""
    name = data.get("protocol") or "reft"
    own = dict(data.pop("protocols", None) or {})
    if name not in PROTOCOLS:
        raise ConfigError(f"task.protocol={name!r} is unknown: choose one of {', '.join(PROTOCOLS)}")
    data["protocol"] = name
    if name == "reft":
        return data
    if name not in own:
        raise ConfigError(f"task={data.get('name')} has no {name} protocol (its YAML has no protocols.{name}): "
                          f"use task.protocol=reft")
    settings = {**_COMMON[name], **dict(own[name] or {})}
    changed = [k for k, v in settings.items() if k in data and data[k] != v and k not in _COMMON[name]]
    if changed:  # an override of these keys at the task's top level is what the reft protocol uses
        log.info("task.protocol=%s sets %s (override them as task.protocols.%s.<key>)", name,
                 ", ".join(f"{k}={settings[k]!r}" for k in changed), name)
    data.update(settings)
    return data
