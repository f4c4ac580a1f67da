"""A task is declared in conf/task/*.yaml; this turns that config into data and checks."""
import random
from dataclasses import dataclass, field

from ..errors import ConfigError
from .answers import ANSWER_CHECKS
from .loaders import LOADERS

_FIELDS = {"name", "version", "source", "template", "target", "answer", "max_new_tokens",
           "train_limit", "eval_limit", "options"}


@dataclass
class Task:
    name: str
    version: int
    source: str
    template: str  # the prompt, formatted with the record's fields
    target: str  # what the model learns to produce after the prompt (EOS is appended)
    answer: str  # name of the answer check
    max_new_tokens: int = 32
    train_limit: int | None = None
    eval_limit: int | None = None
    options: dict = field(default_factory=dict)  # source-specific settings

    def prompt(self, record: dict) -> str:
        return self.template.format(**record)

    def target_text(self, record: dict) -> str:
        return self.target.format(**record)

    def is_correct(self, output: str, record: dict) -> bool:
        return ANSWER_CHECKS[self.answer](output, record["answer"])

    def load(self, seed: int) -> tuple[list[dict], list[dict]]:
        train, test = LOADERS[self.source](self, seed)
        # A fixed subset, the same for every method and seed, so scores compare.
        if self.train_limit and len(train) > self.train_limit:
            train = random.Random(0).sample(train, self.train_limit)
        if self.eval_limit and len(test) > self.eval_limit:
            test = test[: self.eval_limit]
        return train, test


def build(cfg) -> Task:
    data = dict(cfg)
    extra = sorted(set(data) - _FIELDS)
    options = dict(data.pop("options", None) or {})
    for k in extra:  # source-specific keys (data_dir, dataset, ...) sit at the top level of the YAML
        options[k] = data.pop(k)
    missing = [k for k in ("name", "version", "source", "template", "target", "answer") if k not in data]
    if missing:
        raise ConfigError(f"task config lacks {', '.join(missing)}")
    if data["source"] not in LOADERS:
        raise ConfigError(f"task.source={data['source']!r} is unknown: choose one of {', '.join(sorted(LOADERS))}")
    if data["answer"] not in ANSWER_CHECKS:
        raise ConfigError(f"task.answer={data['answer']!r} is unknown: choose one of {', '.join(sorted(ANSWER_CHECKS))}")
    for k in ("train_limit", "eval_limit"):
        if data.get(k) is not None and int(data[k]) < 1:
            raise ConfigError(f"task.{k}={data[k]} must be a positive number of examples (or null for all)")
    return Task(options=options, **data)
