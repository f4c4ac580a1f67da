"""Answer extraction and checking, registered by name (a task's `answer:` field).

A check is `fn(output, answer, **task.answer_args) -> bool`; `output` is the generated text only
(the prompt is not part of it), which is what pyreft/LLM-Adapters look at after their trigger.
"""
import re

ANSWER_CHECKS = {}


def register(name):
    def deco(fn):
        ANSWER_CHECKS[name] = fn
        return fn
    return deco


# stanfordnlp/pyreft examples/loreft/compute_metrics.py extract_answer_number, itself copied from
# AGI-Edgerunners/LLM-Adapters evaluate.py: commas removed, the LAST match of -?\d+\.?\d* .
_NUMBER = re.compile(r"-?\d+\.?\d*")


def last_number(text: str) -> float | None:
    """The last number in the text, commas stripped (the LLM-Adapters arithmetic rule)."""
    found = _NUMBER.findall(str(text).replace(",", ""))
    return float(found[-1]) if found else None


def _as_float(value) -> float | None:
    try:
        return float(str(value).replace(",", "").strip())
    except ValueError:
        return last_number(value)


@register("number")
def check_number(output: str, answer: str, **_) -> bool:
    """pyreft: correct when abs(float(answer) - last number) <= 0.001."""
    pred, gold = last_number(output), _as_float(answer)
    return pred is not None and gold is not None and abs(pred - gold) <= 1e-3


def first_letter(text: str) -> str:
    """AQuA: the FIRST capital A-E anywhere in the stripped output, letters inside words included
    ("Each" gives "E"). LLM-Adapters evaluate.py extract_answer_letter, kept as is by pyreft
    compute_metrics.py (whose docstring notes the rule is ambiguous but keeps it for comparability)."""
    found = re.findall(r"A|B|C|D|E", text.strip())
    return found[0] if found else ""


@register("letter")
def check_letter(output: str, answer: str, **_) -> bool:
    return first_letter(output) == str(answer).strip()


def is_float(value) -> bool:
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


@register("math")
def check_math(output: str, answer: str, **_) -> bool:
    """pyreft compute_metrics.py, task "math": a non-numeric answer is an AQuA letter."""
    return check_number(output, answer) if is_float(str(answer).strip()) else check_letter(output, answer)


def after_trigger(output: str, trigger: str) -> str:
    """pyreft compute_metrics.py extract_output: the text after the first trigger, left-stripped;
    no trigger means an empty generation."""
    start = output.find(trigger)
    return "" if start < 0 else output[start + len(trigger):].lstrip()


@register("trigger_exact")
def check_trigger_exact(output: str, answer: str, trigger: str = "the correct answer is ", **_) -> bool:
    """pyreft compute_metrics.py, task "commonsense" (the ReFT paper's numbers): the text after
    "the correct answer is " equals the answer, stripped. Extra text after the answer is wrong."""
    return after_trigger(output, trigger).strip() == str(answer).strip()


@register("first_match")
def check_first_match(output: str, answer: str, labels: str = "", **_) -> bool:
    """LLM-Adapters commomsense_evaluate.py extract_answer: the first match of the data set's label
    pattern (e.g. `true|false`, `solution1|solution2`) anywhere in the output. Extra text is fine."""
    found = re.findall(labels, output.strip()) if labels else []
    return bool(found) and found[0] == str(answer).strip()


@register("exact")
def check_exact(output: str, answer: str, **_) -> bool:
    """The first line of the output, stripped, equals the answer."""
    lines = output.strip().splitlines()
    return bool(lines) and lines[0].strip() == str(answer).strip()


@register("none")
def check_none(output: str, answer=None, **_) -> bool:
    """Open-ended tasks (AlpacaEval): no automatic answer check; a judge scores them offline."""
    return False
