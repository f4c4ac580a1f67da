"""`reftbench-tune`: tune every method the same way on a dev split, then test the chosen configs.

    reftbench-tune --methods loreft,lora --trials 8 --seeds 42,43,44 --out tuning/chain-sum -- \\
        task.dev_size=100 trainer.max_steps=125

Per method, an optuna study (TPE, seeded) over the `search:` block of conf/intervention/<method>.yaml;
every trial is an ordinary run (the same `run()` as `reftbench`) with `eval_split=dev`, so it trains on
train-minus-dev and scores the dev split only. Every method gets the same trials, overrides and step
budget. The best trial's options are then trained on each of --seeds and scored on the test split.

    <out>/study.db                           optuna's storage: a killed tuning resumes from it
    <out>/trials/<method>/<n>/result.json    trial n (dev score)
    <out>/final/<method>/seed<s>/result.json the chosen options on seed s (test score); config.tuned says how
    <out>/tune.json                          budget, every trial's options and dev score, the choice per method

--jobs N tunes N methods at once, each in its own process (one method's trials, then its final runs);
they share study.db, one study per method.

hydra-optuna-sweeper is not used: its last release (1.3.0) requires optuna<3.
"""
import argparse
import json
import logging
import math
import os
import sys
import zlib
from pathlib import Path

from .errors import ConfigError, ReftbenchError

log = logging.getLogger("reftbench")
FIXED = ("intervention", "seed", "eval_split", "tuned")  # keys reftbench-tune sets itself


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the usage too)
        print(f"reftbench-tune: error: {message}", file=sys.stderr)
        sys.exit(2)


def parse(argv):
    p = _Parser(prog="reftbench-tune", description="Tune methods with an equal budget on a dev split, "
                "then test the chosen options on several seeds. Overrides after `--` apply to every run.")
    p.add_argument("--methods", required=True, help="comma-separated interventions, e.g. loreft,lora")
    p.add_argument("--trials", default="8", help="trials per method (the same for every method)")
    p.add_argument("--seeds", default="42", help="seeds of the final runs of each chosen config, e.g. 42,43,44")
    p.add_argument("--tune-seed", default=None, help="the trials' run seed and the sampler's (default: the first of --seeds)")
    p.add_argument("--random-trials", default=None,
                   help="trials sampled at random before TPE models the rest (default: half of --trials)")
    p.add_argument("--jobs", default="1", help="methods tuned at once, each in its own process (joblib); "
                   "set OMP_NUM_THREADS so that jobs x threads fits the cores")
    p.add_argument("--out", required=True, help="the tuning folder (study.db, trials/, final/, tune.json)")
    p.add_argument("overrides", nargs="*", help="reftbench overrides for every run (model=..., task=..., trainer.max_steps=...)")
    return p.parse_args(argv)


def _ints(text: str, what: str, low: int) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v < low for v in values):
        raise ConfigError(f"{what}={text!r} must be {'an integer' if what != '--seeds' else 'integers'} >= {low}")
    return values


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from .cli import CONF_DIR, _one_line
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return hydra_compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_one_line(str(e))) from None


def value_text(v) -> str:
    """A value as Hydra's override grammar reads it back unchanged."""
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{value_text(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(value_text(x) for x in v) + "]"
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


def search_space(cfg, method: str) -> dict:
    """{override key: optuna distribution} from the method's `search:` block. A key the trainer has
    (lr, weight_decay) sets trainer.<key>; any other key must be one of the method's options."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from omegaconf import OmegaConf
    block = cfg.intervention.get("search")
    if not block:
        raise ConfigError(f"intervention={method} has no search block (add `search:` to conf/intervention/{method}.yaml)")
    space = {}
    for key, spec in OmegaConf.to_container(block, resolve=True).items():
        if spec is None:  # `intervention.search.<key>=null` on the command line: not searched
            continue
        if key in cfg.trainer:
            path = f"trainer.{key}"
        elif key in cfg.intervention and key not in ("name", "search"):
            path = f"intervention.{key}"
        else:
            raise ConfigError(f"intervention={method}: search key {key!r} is neither a trainer option nor one of the method's")
        try:
            if "choices" in spec:
                space[path] = CategoricalDistribution(list(spec["choices"]))
            elif all(isinstance(spec[k], int) for k in ("low", "high")) and not spec.get("float"):
                space[path] = IntDistribution(spec["low"], spec["high"], log=bool(spec.get("log", False)))
            else:
                space[path] = FloatDistribution(float(spec["low"]), float(spec["high"]), log=bool(spec.get("log", False)))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"intervention={method}: search.{key} is malformed ({e}): "
                              "use {choices: [...]} or {low: .., high: .., log: true|false}") from None
    return space


def check_base(cfg, method: str) -> None:
    task = cfg.task
    if task.get("metric") == "alpaca_eval":
        raise ConfigError(f"task={task.name} is judged offline (AlpacaEval): a trial has no score to tune on")
    if task.get("kind") != "classification" and not task.get("dev_size"):
        raise ConfigError(f"tuning scores a dev split: set task.dev_size= (a count or a fraction of task={task.name}'s "
                          "training data; GLUE tasks use their model-selection part)")


def check_overrides(overrides: list[str], searched: set[str]) -> None:
    from .cli import swept_keys
    swept = swept_keys(overrides)
    if swept:
        raise ConfigError(f"overrides sweep {', '.join(sorted(swept))}: reftbench-tune runs single configs "
                          "(methods go in --methods, seeds in --seeds)")
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in FIXED or key.startswith(("hydra.", "hydra/")):
            raise ConfigError(f"override {o!r}: reftbench-tune sets {key} itself (use --methods, --seeds, --tune-seed)")
        if key in searched:
            raise ConfigError(f"override {o!r}: {key} is tuned (a search block names it); drop it from the overrides")


def score_of(record: dict) -> float:
    score = record["metrics"]["trained"].get("score")
    return float("-inf") if score is None or math.isnan(score) else float(score)  # NaN (constant STS-B) ranks last


class Tuning:
    def __init__(self, args, overrides):
        from .cli import quote_semicolons
        self.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if not self.methods or len(set(self.methods)) < len(self.methods):
            raise ConfigError(f"--methods={args.methods!r} must name each method once, e.g. loreft,lora")
        self.trials = _ints(args.trials, "--trials", 1)[0]
        self.seeds = _ints(args.seeds, "--seeds", 0)
        self.tune_seed = _ints(args.tune_seed, "--tune-seed", 0)[0] if args.tune_seed is not None else self.seeds[0]
        self.random_trials = (_ints(args.random_trials, "--random-trials", 0)[0] if args.random_trials is not None
                              else max(1, self.trials // 2))
        self.jobs = _ints(args.jobs, "--jobs", 1)[0]
        self.out = Path(args.out)
        self.writes = True  # False in a --jobs worker: the parent writes tune.json
        self.overrides = quote_semicolons(list(overrides))
        check_overrides(self.overrides, set())
        self.spaces, self.base = {}, {}
        first = compose(self.overrides)
        if first.task.get("kind") == "classification" and first.task.get("split_seed") is None:
            # GLUE's selection (= dev) and test halves follow the run seed: fixed to the tuning seed, no
            # final seed tests on examples the trials were selected on
            self.overrides.append(f"task.split_seed={self.tune_seed}")
        for m in self.methods:  # every bad input ends here, before anything trains
            cfg = compose(self.overrides + [f"intervention={m}"])
            self.spaces[m] = search_space(cfg, m)
            check_base(cfg, m)
            self.base[m] = cfg
        check_overrides(self.overrides, {k for s in self.spaces.values() for k in s})
        self.budget = {"trials": self.trials, "max_steps": self.base[self.methods[0]].trainer.max_steps,
                       "epochs": self.base[self.methods[0]].trainer.epochs,
                       "batch_size": self.base[self.methods[0]].trainer.batch_size,
                       "metric": self.base[self.methods[0]].task.get("metric", "accuracy"),
                       "tune_seed": self.tune_seed, "random_trials": self.random_trials, "overrides": self.overrides}
        self.summary = {"budget": self.budget, "seeds": self.seeds, "study": str(self.out / "study.db"), "methods": {}}

    # --- the study ---------------------------------------------------------------------------------
    def study(self, method: str):
        import optuna
        self.out.mkdir(parents=True, exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # --jobs workers share the file: a writer waits for the lock instead of failing after 5 s
        storage = optuna.storages.RDBStorage(f"sqlite:///{self.out / 'study.db'}",
                                             engine_kwargs={"connect_args": {"timeout": 600}})
        study = optuna.create_study(storage=storage, study_name=method, direction="maximize", load_if_exists=True)
        settings = {"overrides": self.overrides, "tune_seed": self.tune_seed, "random_trials": self.random_trials,
                    "space": {k: repr(d) for k, d in self.spaces[method].items()}}
        stored = study.user_attrs.get("settings")
        if stored is None:
            study.set_user_attr("settings", settings)
        elif stored != settings:  # other overrides or space: its trials would not compare with new ones
            raise ConfigError(f"{self.out} holds a {method} study with other settings ({_diff(stored, settings)}): "
                              "use another --out, or the same overrides as before")
        return study

    def trial_overrides(self, method: str, params: dict, seed: int, extra: list[str]) -> list[str]:
        return (self.overrides + [f"intervention={method}", f"seed={seed}"]
                + [f"{k}={value_text(v)}" for k, v in params.items()] + extra)

    def run_trial(self, method: str, number: int, params: dict) -> dict:
        from .run import finished, run
        overrides = self.trial_overrides(method, params, self.tune_seed, ["eval_split=dev"])
        cfg, folder = compose(overrides), self.out / "trials" / method / str(number)
        record = finished(cfg, folder)  # done before the process was killed: not trained again
        return record if record is not None else run(cfg, folder, overrides=overrides)

    def recover(self, study, method: str) -> None:
        """Trials a killed tuning left RUNNING: complete the ones whose run finished (result.json
        written), and queue the others' options again (their folder's checkpoint is not reused)."""
        from optuna.trial import TrialState
        from .run import finished
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            cfg = compose(self.trial_overrides(method, t.params, self.tune_seed, ["eval_split=dev"]))
            record = finished(cfg, self.out / "trials" / method / str(t.number))
            if record is not None:
                study.tell(t.number, score_of(record))
            else:
                study.tell(t.number, state=TrialState.FAIL)
                study.enqueue_trial(t.params)

    def tune(self, method: str):
        import optuna
        from optuna.trial import TrialState
        study = self.study(method)
        self.recover(study, method)
        crc = zlib.crc32(method.encode())
        while (done := len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))) < self.trials:
            # a sampler seeded per trial: a resumed tuning draws what an uninterrupted one would have
            study.sampler = optuna.samplers.TPESampler(seed=(self.tune_seed * 1_000_003 + crc + done) % 2**32,
                                                       n_startup_trials=self.random_trials)
            trial = study.ask(self.spaces[method])
            try:
                record = self.run_trial(method, trial.number, trial.params)
            except ReftbenchError:
                study.tell(trial, state=TrialState.FAIL)
                raise
            study.tell(trial, score_of(record))
            print(f"{method} trial {done + 1}/{self.trials} (#{trial.number}): {_params_text(trial.params)} -> "
                  f"dev {self.budget['metric']} {score_of(record):.4f}", flush=True)
            self.note_trials(method, study)
        self.note_trials(method, study)
        return study

    def note_trials(self, method: str, study) -> None:
        from optuna.trial import TrialState
        trials = [{"number": t.number, "state": t.state.name, "params": t.params, "dev_score": t.value,
                   "folder": str(self.out / "trials" / method / str(t.number))}
                  for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.FAIL)]
        entry = self.summary["methods"].setdefault(method, {})
        entry.update({"search": {k: repr(d) for k, d in self.spaces[method].items()}, "trials": trials})
        self.write()

    # --- the chosen configs on the test split --------------------------------------------------------
    def final(self, method: str, study) -> None:
        from optuna.trial import TrialState
        from .run import finished, run
        # the best of the first --trials finished trials: a study grown by an earlier, longer tuning
        # still chooses within this budget (ties: the earlier trial)
        done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
        best = max(done[: self.trials], key=lambda t: t.value)
        dev_record = json.loads((self.out / "trials" / method / str(best.number) / "result.json").read_text())
        tuned = {"trials": self.trials, "max_steps": self.budget["max_steps"], "epochs": self.budget["epochs"],
                 "dev_size": dev_record["data"].get("dev_size"), "dev_digest": dev_record["data"].get("dev_digest"),
                 "metric": self.budget["metric"], "study": str(self.out / "study.db"), "trial": best.number,
                 "dev_score": best.value, "params": [f"{k}={value_text(v)}" for k, v in best.params.items()]}
        entry = self.summary["methods"][method]
        entry["chosen"] = {"trial": best.number, "params": best.params, "dev_score": best.value}
        entry["final"] = {}
        for seed in self.seeds:
            overrides = self.trial_overrides(method, best.params, seed, [f"tuned={value_text(tuned)}"])
            cfg, folder = compose(overrides), self.out / "final" / method / f"seed{seed}"
            record = finished(cfg, folder) or run(cfg, folder, overrides=overrides)
            entry["final"][str(seed)] = {"folder": str(folder), "test_score": record["metrics"]["trained"].get("score")}
            print(f"{method} seed {seed}: test {self.budget['metric']} "
                  f"{record['metrics']['trained'].get('score', float('nan')):.4f} ({_params_text(best.params)})", flush=True)
            self.write()

    def write(self) -> None:
        from .record import write_json_atomic
        if self.writes:
            write_json_atomic(self.out / "tune.json", self.summary)

    def one_method(self, method: str) -> dict:
        """A --jobs worker: one method's trials, then its final runs; the parent merges the entries."""
        _logging()
        self.writes = False
        self.final(method, self.tune(method))
        return self.summary["methods"][method]

    def __call__(self) -> dict:
        jobs = min(self.jobs, len(self.methods))
        if jobs == 1:
            studies = {m: self.tune(m) for m in self.methods}  # every method's trials first, then the test runs
            for m in self.methods:
                self.final(m, studies[m])
            return self.summary
        from joblib import Parallel, delayed
        for m in self.methods:  # the studies (and SQLite's tables) exist before the workers open the file
            self.study(m)
        entries = Parallel(n_jobs=jobs, backend="loky")(delayed(self.one_method)(m) for m in self.methods)
        self.summary["methods"] = dict(zip(self.methods, entries))
        self.write()
        return self.summary


def _params_text(params: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _diff(old: dict, new: dict) -> str:
    return ", ".join(f"{k} was {old.get(k)!r}" for k in new if old.get(k) != new[k])


def _logging() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    _logging()
    try:
        summary = Tuning(args, args.overrides)()
    except ReftbenchError as e:
        print(f"reftbench-tune: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    print(f"tuning: {Path(args.out) / 'tune.json'} ({len(summary['methods'])} methods, "
          f"{summary['budget']['trials']} trials each, seeds {','.join(map(str, summary['seeds']))})")


def entry() -> None:
    """The `reftbench-tune` command: glibc's malloc set up for training (see allocator.py), then main."""
    from . import allocator
    allocator.reexec()
    main()


if __name__ == "__main__":
    entry()
