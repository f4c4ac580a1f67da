"""A task is declared in conf/task/*.yaml; this turns that config into data and checks."""
import hashlib
import json
import random
import string
from dataclasses import dataclass, field, fields

from ..errors import ConfigError
from . import protocols
from .answers import ANSWER_CHECKS
from .loaders import LOADERS
from .metrics import GLUE_TASKS, split_validation

KINDS = ("generation", "classification")
DEV_SEED = 17  # the dev split's own seed: not the run's, so every method and seed holds out the same examples
METRICS = {"accuracy", "alpaca_eval", "matthews_correlation", "pearson"}


@dataclass
class Task:
    name: str
    version: int  # bump when data, template, answer check, metric or generation settings change
    source: str  # a loader in loaders.py
    template: str = ""  # the prompt, formatted with the record's fields
    target: str = ""  # what the model learns to produce after the prompt (EOS is appended)
    answer: str = "none"  # name of the answer check in answers.py
    kind: str = "generation"  # or "classification" (GLUE: a head on an encoder, no prompt)
    family: str = ""  # commonsense, arithmetic, instruction, glue: for grouping results
    metric: str = "accuracy"  # the headline number: accuracy, alpaca_eval, matthews_correlation, pearson
    max_new_tokens: int = 32
    generation: dict = field(default_factory=dict)  # extra model.generate kwargs (greedy is the default)
    input_template: str | None = None  # the prompt for records whose `input` is not empty
    answer_args: dict = field(default_factory=dict)  # keyword arguments of the answer check
    eval_tasks: list = field(default_factory=list)  # several test sets: names of roles in files/hub
    files: dict = field(default_factory=dict)  # role (train, test, ...) -> file(s) under task.data_dir
    hub: dict = field(default_factory=dict)  # role -> datasets.load_dataset kwargs, used without data_dir
    num_labels: int | None = None  # classification: 1 means regression (STS-B)
    train_limit: int | None = None
    dev_size: int | float | None = None  # training examples held out as a dev split: a count or a fraction
    split_seed: int | None = None  # GLUE: the seed of the selection/test halves (null: the run's, as pyreft)
    eval_limit: int | None = None
    heldout: int = 0  # training examples kept aside to report the answer loss on (open-ended tasks)
    protocol: str = "reft"  # reft or llm_adapters (tasks/protocols.py): prompts, loss and answer check
    train_template: str | None = None  # loss_on_prompt: the whole training text, output included
    train_input_template: str | None = None  # the same for records whose `input` is not empty
    loss_on_prompt: bool = False  # the loss covers prompt and answer (LLM-Adapters), not the answer only
    cut_at: str | None = None  # the answer check reads the output up to this text
    answer_args_by_set: dict = field(default_factory=dict)  # eval set -> answer_args (several test sets)
    options: dict = field(default_factory=dict)  # source-specific settings
    # role -> "git-sha1:<hex>" or "sha256:<hex>" of the paper's file: a run on other data is not the paper's row
    checksums: dict = field(default_factory=dict)
    # filled by the loader: role -> [{path, bytes, sha256, git_sha1}] of each local file read
    loaded_files: dict = field(default_factory=dict, init=False)

    @property
    def judged_offline(self) -> bool:
        """Its answers are scored by an external judge (AlpacaEval), so a run has no score of its own."""
        return self.metric == "alpaca_eval"

    def prompt(self, record: dict) -> str:
        self._need_generation()
        if self.input_template and record.get("input"):
            return self.input_template.format(**record)
        return self.template.format(**record)

    def target_text(self, record: dict) -> str:
        self._need_generation()
        return self.target.format(**record)

    def train_text(self, record: dict) -> str:
        """loss_on_prompt: the whole training text, one string (LLM-Adapters tokenises it at once)."""
        self._need_generation()
        use_input = self.train_input_template and record.get("input")
        return (self.train_input_template if use_input else self.train_template).format(**record)

    def train_prompt(self, record: dict) -> str:
        """The training text without its output: where the prompt ends (ReFT's positions count in it)."""
        return self.train_text({**record, "output": ""})

    def is_correct(self, output: str, record: dict) -> bool:
        if self.cut_at:
            output = output.split(self.cut_at)[0]
        args = self.answer_args_by_set.get(record.get("eval_task"), self.answer_args)
        return ANSWER_CHECKS[self.answer](output, record.get("answer"), **args)

    def load_splits(self, seed: int) -> dict[str, list[dict]]:
        """{"train", "test"}, "dev" where the task has one and, for classification, "select": the
        part of the validation set used for model selection during training (the rest is the test
        part). On classification tasks "dev" is that selection part; elsewhere it is `dev_size`
        training examples carved out before `train_limit` sampling (see `carve_dev`)."""
        raw = LOADERS[self.source](self, seed)
        out = {"train": raw["train"]}
        if self.eval_tasks:  # one training set, several test sets: tag each record with its set
            out["test"] = [dict(r, eval_task=name) for name in self.eval_tasks for r in self._limit(raw[name])]
        elif self.kind == "classification":
            halves = seed if self.split_seed is None else int(self.split_seed)
            out["select"], test = split_validation(raw["validation"], halves)
            out["test"] = self._limit(test)
            out["dev"] = out["select"]
        else:
            out["test"] = self._limit(raw["test"])
        if self.dev_size:
            out["dev"], out["train"] = carve_dev(out["train"], self.dev_count(len(out["train"])), out["test"])
        # A fixed subset, the same for every method and seed, so scores compare.
        if self.train_limit and len(out["train"]) > self.train_limit:
            out["train"] = random.Random(0).sample(out["train"], self.train_limit)
        return out

    def dev_count(self, n_train: int) -> int:
        size = self.dev_size
        count = int(size) if isinstance(size, int) else round(float(size) * n_train)
        if not 0 < count < n_train:
            raise ConfigError(f"task.dev_size={size} leaves no dev or no training example of task={self.name}'s "
                              f"{n_train} (use a count below {n_train} or a fraction in (0, 1))")
        return count

    def load(self, seed: int) -> tuple[list[dict], list[dict]]:
        splits = self.load_splits(seed)
        return splits["train"], splits["test"]

    def _need_generation(self):
        if self.kind != "generation":
            raise ConfigError(f"task={self.name} is a {self.kind} task (GLUE): it has no prompt or target text; "
                              "it needs a sequence-classification loop, not generation")

    def _limit(self, records):
        return records[: self.eval_limit] if self.eval_limit else records

    def record_fields(self, role: str) -> tuple[str, ...]:
        """The record fields a role's data must have: those the templates use, and `answer`
        when it is checked."""
        used = {f for _, f, _, _ in string.Formatter().parse(self.template) if f}
        if role == "train":
            for text in (self.target, self.train_template or ""):
                used |= {f for _, f, _, _ in string.Formatter().parse(text) if f}
        elif self.answer != "none":
            used.add("answer")
        return tuple(sorted(used))


def _key(record: dict) -> str:
    return json.dumps({k: v for k, v in record.items() if k != "eval_task"}, sort_keys=True, default=str)


def carve_dev(train: list[dict], n: int, test: list[dict]) -> tuple[list[dict], list[dict]]:
    """(dev, rest): n training records drawn with DEV_SEED from the loaded training data, so the dev
    split depends only on the data (never on the run's seed, the method or train_limit, which samples
    from the rest afterwards). Duplicates are removed across the cut: a rest record equal to a dev
    record is dropped, and so is a dev record equal to a test record, so the three are disjoint."""
    picked = set(random.Random(DEV_SEED).sample(range(len(train)), n))
    test_keys = {_key(r) for r in test}
    dev = [r for i, r in enumerate(train) if i in picked and _key(r) not in test_keys]
    dev_keys = {_key(r) for r in dev}
    return dev, [r for i, r in enumerate(train) if i not in picked and _key(r) not in dev_keys]


def dev_facts(splits: dict, eval_split: str) -> dict:
    """For result.json's `data`: the dev split's size and digest (the same digest = the same dev
    examples), and which split the run scores. eval_split=dev without a dev split is an error."""
    dev = splits.get("dev")
    if eval_split == "dev" and not dev:
        raise ConfigError("eval_split=dev needs a dev split: set task.dev_size (a count or a fraction of the "
                          "training data; GLUE tasks use their model-selection part)")
    digest = hashlib.sha256(json.dumps(dev, sort_keys=True, default=str).encode()).hexdigest() if dev else None
    return {"dev_size": len(dev) if dev else None, "dev_digest": digest, "eval_split": eval_split}


_FIELDS = {f.name for f in fields(Task) if f.init}


def build(cfg) -> Task:
    data = protocols.apply(dict(cfg))
    extra = sorted(set(data) - _FIELDS)
    options = dict(data.pop("options", None) or {})
    for k in extra:  # source-specific keys (data_dir, dataset, ...) sit at the top level of the YAML
        options[k] = data.pop(k)
    kind = data.get("kind", "generation")
    if kind not in KINDS:
        raise ConfigError(f"task.kind={kind!r} is unknown: choose one of {', '.join(KINDS)}")
    needed = ("name", "version", "source") + (("template", "target", "answer") if kind == "generation" else ())
    missing = [k for k in needed if k not in data]
    if missing:
        raise ConfigError(f"task config lacks {', '.join(missing)}")
    if data["source"] not in LOADERS:
        raise ConfigError(f"task.source={data['source']!r} is unknown: choose one of {', '.join(sorted(LOADERS))}")
    if data.get("answer", "none") not in ANSWER_CHECKS:
        raise ConfigError(f"task.answer={data['answer']!r} is unknown: choose one of {', '.join(sorted(ANSWER_CHECKS))}")
    if data.get("answer") == "first_match":
        by_set = _plain(data.get("answer_args_by_set") or {})
        sets = data.get("eval_tasks") or []
        if not (data.get("answer_args") or {}).get("labels") and not (sets and all(
                (by_set.get(t) or {}).get("labels") for t in sets)):
            raise ConfigError(f"task={data['name']}: answer=first_match needs answer_args.labels (e.g. true|false), "
                              "or answer_args_by_set.<set>.labels for each test set")
    if data.get("metric", "accuracy") not in METRICS:
        raise ConfigError(f"task.metric={data['metric']!r} is unknown: choose one of {', '.join(sorted(METRICS))}")
    if kind == "classification" and options.get("glue_task", data["name"]) not in GLUE_TASKS:
        raise ConfigError(f"task={data['name']}: classification tasks are GLUE tasks ({', '.join(GLUE_TASKS)}); "
                          "set glue_task=")
    for k in ("train_limit", "eval_limit"):
        if data.get(k) is not None and int(data[k]) < 1:
            raise ConfigError(f"task.{k}={data[k]} must be a positive number of examples (or null for all)")
    split_seed = data.get("split_seed")
    if split_seed is not None and (isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0):
        raise ConfigError(f"task.split_seed={split_seed!r} must be a non-negative integer (or null: the run's seed)")
    dev = data.get("dev_size")
    if dev is not None:
        if isinstance(dev, bool) or not isinstance(dev, (int, float)) or dev <= 0 or (isinstance(dev, float) and dev >= 1):
            raise ConfigError(f"task.dev_size={dev!r} must be a count of training examples (>= 1), "
                              "a fraction in (0, 1), or null for no dev split")
        if kind == "classification":
            raise ConfigError(f"task={data['name']} is a GLUE task: its dev split is the validation set's "
                              "model-selection part already; leave task.dev_size null")
    for k in ("generation", "answer_args", "files", "hub", "checksums", "answer_args_by_set"):  # plain dicts
        data[k] = _plain(data.get(k) or {})
    data["eval_tasks"] = list(data.get("eval_tasks") or [])
    return Task(options=_plain(options), **data)


def _plain(value):
    try:
        from omegaconf import OmegaConf
        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:
        pass
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
