"""Answer extraction and checking, registered by name (a task's `answer:` field)."""
import re

ANSWER_CHECKS = {}


def register(name):
    def deco(fn):
        ANSWER_CHECKS[name] = fn
        return fn
    return deco


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number in the text, commas stripped (the LLM-Adapters arithmetic rule)."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


@register("number")
def check_number(output: str, answer: str) -> bool:
    pred = last_number(output)
    gold = last_number(str(answer))
    return pred is not None and gold is not None and abs(pred - gold) < 1e-3


@register("exact")
def check_exact(output: str, answer: str) -> bool:
    """The first line of the output, stripped, equals the answer."""
    lines = output.strip().splitlines()
    return bool(lines) and lines[0].strip() == str(answer).strip()
