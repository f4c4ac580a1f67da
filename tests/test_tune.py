"""The dev split, eval_split=dev and reftbench-tune (tiny random model, a few steps per run)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from reftbench import methods, run as run_module, tasks, tune
from reftbench.errors import ConfigError
from reftbench.objectives import Generation

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FIX = Path(__file__).resolve().parent / "fixtures"
TINY = ["model=tiny-random-llama", "trainer.max_steps=2", "task.train_limit=16", "task.eval_limit=4",
        "task.dev_size=4", "task.max_new_tokens=2", "trainer.checkpoints=false", "trainer.batch_size=4", "eval_batch_size=8",
        "save_intervention=false"]


def task(name, **over):
    cfg = OmegaConf.load(CONF / "task" / f"{name}.yaml")
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return tasks.build(cfg)


def questions(records):
    return {r["question"] for r in records}


# --- the dev split -----------------------------------------------------------------------------------

def test_dev_split_is_disjoint_fixed_and_independent_of_the_run_seed():
    t = task("chain-sum", train_limit=40, eval_limit=10, dev_size=8)
    a, b = t.load_splits(1), t.load_splits(2)
    assert a["dev"] == b["dev"] and a["train"] == b["train"]  # the run seed does not move it
    assert len(a["dev"]) == 8 and len(a["train"]) == 32
    assert not questions(a["dev"]) & questions(a["train"]) and not questions(a["dev"]) & questions(a["test"])
    plain = task("chain-sum", train_limit=40, eval_limit=10).load_splits(1)
    assert "dev" not in plain and len(plain["train"]) == 40  # no dev_size: the training data as before
    assert questions(a["dev"]) | questions(a["train"]) == questions(plain["train"])
    assert len(task("chain-sum", train_limit=40, eval_limit=10, dev_size=0.25).load_splits(1)["dev"]) == 10


def test_dev_split_is_carved_before_train_limit_sampling():
    full = task("boolq", data_dir=str(FIX / "llm-adapters"), dev_size=3).load_splits(0)
    limited = task("boolq", data_dir=str(FIX / "llm-adapters"), dev_size=3, train_limit=2).load_splits(0)
    assert full["dev"] == limited["dev"] and len(full["dev"]) == 3
    assert len(limited["train"]) == 2 and all(r in full["train"] for r in limited["train"])
    keys = {json.dumps(r, sort_keys=True) for r in full["dev"]}
    assert not keys & {json.dumps(r, sort_keys=True) for r in full["train"]}


def test_duplicates_never_cross_the_cut():
    rows = [{"question": f"q{i % 5}", "answer": "1"} for i in range(20)]  # every record four times
    dev, rest = tasks.base.carve_dev(rows, 3, test=[{"question": "q4", "answer": "1"}])
    assert dev and not {r["question"] for r in dev} & {r["question"] for r in rest}
    assert all(r["question"] != "q4" for r in dev)


def test_glue_dev_is_the_selection_part_and_facts_are_recorded():
    t = task("sst2", data_dir=str(FIX / "glue" / "SST-2"))
    splits = t.load_splits(42)
    assert splits["dev"] == splits["select"] and splits["dev"]
    facts = tasks.dev_facts(splits, "dev")
    assert facts["dev_size"] == len(splits["select"]) and len(facts["dev_digest"]) == 64
    assert tasks.dev_facts(t.load_splits(42), "test")["dev_digest"] == facts["dev_digest"]


@pytest.mark.parametrize("value,needle", [(0, "dev_size=0"), (1.0, "fraction"), (-3, "dev_size=-3"), ("x", "dev_size='x'")])
def test_bad_dev_size_is_one_line(value, needle):
    with pytest.raises(ConfigError, match="task.dev_size") as e:
        task("chain-sum", dev_size=value)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_dev_size_errors_on_glue_too_large_and_eval_split_without_dev():
    with pytest.raises(ConfigError, match="GLUE task"):
        task("sst2", dev_size=10)
    with pytest.raises(ConfigError, match="leaves no dev or no training"):
        task("chain-sum", train_limit=10, eval_limit=5, dev_size=10).load_splits(0)
    with pytest.raises(ConfigError, match="eval_split=dev needs a dev split"):
        tasks.dev_facts(task("chain-sum", train_limit=10, eval_limit=5).load_splits(0), "dev")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["eval_split=train"])
    with pytest.raises(ConfigError, match="eval_split='train' is unknown"):
        run_module.check_run(cfg)


# --- search blocks -----------------------------------------------------------------------------------

def test_a_search_key_set_to_null_is_not_searched():
    """`++intervention.search.dropout=null` narrows every method's space to its other keys (a method
    whose block lacks the key is unchanged)."""
    narrow = ["++intervention.search.dropout=null", "++intervention.search.alpha=null"]
    lora = tune.compose(narrow + ["intervention=lora"])
    assert sorted(tune.search_space(lora, "lora")) == ["intervention.rank", "trainer.lr"]
    assert len(tune.search_space(tune.compose(["intervention=lora"]), "lora")) == 4
    red = tune.compose(narrow + ["intervention=red"])
    assert sorted(tune.search_space(red, "red")) == ["trainer.lr", "trainer.weight_decay"]


def test_every_search_block_composes_at_its_bounds():
    from conftest import tiny_bert, tiny_llama
    from reftbench.train import check_trainer
    from optuna.distributions import CategoricalDistribution
    llama, bert = tiny_llama().model, tiny_bert()
    names = sorted(p.stem for p in (CONF / "intervention").glob("*.yaml"))
    assert len(names) >= 14
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name in names:
            base = compose("config", overrides=[f"intervention={name}"])
            space = tune.search_space(base, name)
            assert any(k == "trainer.lr" for k in space), name  # every method tunes its learning rate
            values = {k: list(d.choices) if isinstance(d, CategoricalDistribution) else [d.low, d.high]
                      for k, d in space.items()}
            for i in range(max(len(v) for v in values.values())):  # every bound and choice at least once
                chosen = {k: v[min(i, len(v) - 1)] for k, v in values.items()}
                cfg = compose("config", overrides=[f"intervention={name}", "model=tiny-random-llama"]
                              + [f"{k}={tune.value_text(v)}" for k, v in chosen.items()])
                assert all(OmegaConf.select(cfg, k) == v for k, v in chosen.items())
                check_trainer(cfg.trainer)
                methods.check(cfg.intervention, bert if name == "bitfit" else llama)


def test_value_text_reads_back_through_hydra():
    tuned = {"trials": 8, "max_steps": None, "study": "a b/c:d's/study.db", "dev_score": 0.5,
             "params": ["trainer.lr=0.001", "intervention.rank=4"]}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"tuned={tune.value_text(tuned)}", f"trainer.lr={tune.value_text(1e-05)}"])
    assert OmegaConf.to_container(cfg.tuned) == tuned and cfg.trainer.lr == 1e-05


# --- reftbench-tune ------------------------------------------------------------------------------------

@pytest.fixture
def scored(monkeypatch):
    """Which run folder scored which questions: every call of the objective's evaluate."""
    seen, where = [], {}
    real_run, real_eval = run_module.run, Generation.evaluate

    def run(cfg, out_dir, overrides=None):
        where["dir"] = Path(out_dir)
        seen.append((Path(out_dir), None))
        return real_run(cfg, out_dir, overrides=overrides)

    def evaluate(self, model, records, *a, **k):
        seen.append((where["dir"], questions(records)))
        return real_eval(self, model, records, *a, **k)

    monkeypatch.setattr(run_module, "run", run)
    monkeypatch.setattr(Generation, "evaluate", evaluate)
    return seen


def runs_in(seen):
    return [d for d, q in seen if q is None]


def test_tune_two_methods_scores_dev_in_trials_and_test_in_final_runs(tmp_path, scored, capsys):
    out, cache = tmp_path / "tuning", tmp_path / "cache"
    tune.main(["--methods", "loreft,lora", "--trials", "2", "--seeds", "1,2", "--out", str(out),
               "--", *TINY, f"cache_dir={cache}"])
    assert "tuning:" in capsys.readouterr().out
    summary = json.loads((out / "tune.json").read_text())
    assert summary["budget"]["trials"] == 2 and summary["budget"]["max_steps"] == 2
    splits = task("chain-sum", train_limit=16, eval_limit=4, dev_size=4).load_splits(1)
    dev, test = questions(splits["dev"]), questions(splits["test"])
    assert (out / "study.db").is_file()
    for m in ("loreft", "lora"):
        entry = summary["methods"][m]
        assert [t["number"] for t in entry["trials"]] == [0, 1] and all(t["state"] == "COMPLETE" for t in entry["trials"])
        assert sorted(p.name for p in (out / "trials" / m).iterdir()) == ["0", "1"]
        assert sorted(p.name for p in (out / "final" / m).iterdir()) == ["seed1", "seed2"]
        best = max(entry["trials"], key=lambda t: t["dev_score"])
        assert entry["chosen"]["params"] == best["params"]
        for t in entry["trials"]:
            rec = json.loads((out / "trials" / m / str(t["number"]) / "result.json").read_text())
            assert rec["data"]["eval_split"] == "dev" and rec["data"]["dev_size"] == 4
            assert rec["metrics"]["trained"]["n"] == 4 and rec["metrics"]["trained"]["score"] == t["dev_score"]
            assert rec["config"]["tuned"] is None
        for seed in (1, 2):
            rec = json.loads((out / "final" / m / f"seed{seed}" / "result.json").read_text())
            assert rec["seed"] == seed and rec["data"]["eval_split"] == "test"
            tuned = rec["config"]["tuned"]
            assert tuned["trials"] == 2 and tuned["max_steps"] == 2 and tuned["dev_size"] == 4
            assert tuned["metric"] == "accuracy" and tuned["study"] == str(out / "study.db")
            for key, v in entry["chosen"]["params"].items():  # the final runs train the chosen options
                assert OmegaConf.select(OmegaConf.create(rec["config"]), key) == v
            assert entry["final"][str(seed)]["test_score"] == rec["metrics"]["trained"]["score"]
    trial_sets = [q for d, q in scored if q is not None and "trials" in d.parts]
    final_sets = [q for d, q in scored if q is not None and "final" in d.parts]
    assert trial_sets and all(q == dev for q in trial_sets)  # no test example is ever scored in a trial
    assert final_sets and all(q == test for q in final_sets)
    assert len(runs_in(scored)) == 8
    # the frozen score is cached per test set and model (a random model's weights follow its seed):
    # dev (seed 1) and test (seeds 1, 2) are three entries, never one
    from reftbench.cache import digest
    entries = [json.loads(p.read_text()) for p in (cache / "frozen").glob("*.json")]
    assert sorted(e["key"]["test_set"] for e in entries) == sorted(
        [digest(splits["dev"]), digest(splits["test"]), digest(splits["test"])])


def test_killed_tuning_resumes_without_redoing_trials(tmp_path, monkeypatch):
    out = tmp_path / "tuning"
    calls, real_run = [], run_module.run
    kill = {"before": False, "after": False}

    def run(cfg, out_dir, overrides=None):
        calls.append(Path(out_dir).relative_to(out))
        if kill["before"]:
            kill["before"] = False
            raise KeyboardInterrupt  # killed while training: no result.json
        record = real_run(cfg, out_dir, overrides=overrides)
        if kill["after"]:
            kill["after"] = False
            raise KeyboardInterrupt  # killed after result.json, before the study heard of it
        return record

    monkeypatch.setattr(run_module, "run", run)
    args = ["--methods", "loreft", "--seeds", "1", "--out", str(out), "--", *TINY, "cache=false", "eval_frozen=false"]
    kill["after"] = True
    with pytest.raises(KeyboardInterrupt):
        tune.main(["--trials", "1", *args])
    assert calls == [Path("trials/loreft/0")]
    tune.main(["--trials", "2", *args])  # trial 0 is taken from its result.json
    assert calls[1:] == [Path("trials/loreft/1"), Path("final/loreft/seed1")]
    kill["before"] = True
    with pytest.raises(KeyboardInterrupt):
        tune.main(["--trials", "3", *args])
    assert calls[3:] == [Path("trials/loreft/2")]
    tune.main(["--trials", "3", *args])  # the killed trial's options again, then the final run if the choice moved
    assert calls[4] == Path("trials/loreft/3") and all("trials" not in c.parts for c in calls[5:])
    trials = {t["number"]: t for t in json.loads((out / "tune.json").read_text())["methods"]["loreft"]["trials"]}
    assert trials[2]["state"] == "FAIL" and trials[3]["params"] == trials[2]["params"]
    assert [n for n, t in trials.items() if t["state"] == "COMPLETE"] == [0, 1, 3]
    before = len(calls)
    tune.main(["--trials", "3", *args])  # all done: nothing runs
    assert len(calls) == before


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        tune.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("reftbench-tune: error:"), err
    return err


@pytest.mark.parametrize("argv,needle", [
    (["--methods", "nope"], "intervention=nope is unknown"),
    (["--methods", "loreft", "--trials", "0"], "--trials='0'"),
    (["--methods", "loreft", "--trials", "two"], "--trials='two'"),
    (["--methods", "loreft,loreft"], "each method once"),
    (["--methods", "loreft", "--", "~intervention.search"], "has no search block"),
    (["--methods", "loreft", "--", "task.dev_size=null"], "set task.dev_size"),
    (["--methods", "loreft", "--", "intervention=lora"], "sets intervention itself"),
    (["--methods", "loreft", "--", "seed=1,2"], "sweep seed"),
    (["--methods", "loreft", "--", "trainer.lr=1e-3"], "trainer.lr is tuned"),
    (["--methods", "loreft", "--", "task=alpaca"], "judged offline"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    argv = argv[:1] + [argv[1], "--out", str(tmp_path / "t")] + argv[2:]
    if "--" not in argv:
        argv += ["--"]
    argv += ["model=tiny-random-llama", "task.dev_size=4"] if "task.dev_size=null" not in argv and "task=alpaca" not in argv else []
    assert needle in _error(argv, capsys)
    assert not (tmp_path / "t" / "trials").exists()


def test_other_settings_in_the_same_folder_are_refused(tmp_path, capsys):
    out = tmp_path / "t"
    tune.Tuning(tune.parse(["--methods", "loreft", "--out", str(out), "--", *TINY]), TINY).study("loreft")
    err = _error(["--methods", "loreft", "--out", str(out), "--", *TINY, "trainer.max_steps=3"], capsys)
    assert "other settings" in err and "overrides was" in err


def test_command_line_module_exits_2_without_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run([sys.executable, "-m", "reftbench.tune", "--methods", "loreft", "--trials", "-1",
                          "--out", str(tmp_path / "t")], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == "reftbench-tune: error: --trials='-1' must be an integer >= 1"


def test_report_groups_runs_with_and_without_a_search_block_together():
    from reftbench.report.tables import options
    old = {"config": {"intervention": {"name": "loreft", "rank": 4}, "trainer": {"lr": None}, "task": {"name": "t"}}}
    new = json.loads(json.dumps(old))
    new["config"]["intervention"]["search"] = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}
    assert options(new) == options(old)
    new["config"]["intervention"]["rank"] = 8
    assert options(new) != options(old)


def test_glue_tuning_fixes_the_validation_halves_to_the_tuning_seed(tmp_path):
    fixed = task("sst2", data_dir=str(FIX / "glue" / "SST-2"), split_seed=7)
    pyreft = task("sst2", data_dir=str(FIX / "glue" / "SST-2"))  # the halves follow the run seed
    assert fixed.load_splits(1)["select"] == fixed.load_splits(2)["select"] == pyreft.load_splits(7)["select"]
    assert pyreft.load_splits(1)["select"] != pyreft.load_splits(2)["select"]
    over = ["model=tiny-random-bert", "task=sst2"]
    tuning = tune.Tuning(tune.parse(["--methods", "loreft,lora", "--seeds", "5,6", "--out", str(tmp_path)]), over)
    assert tuning.overrides == over + ["task.split_seed=5"]
    with pytest.raises(ConfigError, match="task.split_seed='x'"):
        task("sst2", split_seed="x")


def test_jobs_tune_methods_in_parallel_processes_with_the_same_results(tmp_path):
    """--jobs 2: each method in its own process, sharing study.db; the same choices and scores as one process."""
    def tuned(out, jobs):
        tune.main(["--methods", "loreft,lora", "--trials", "2", "--seeds", "1", "--jobs", str(jobs), "--out", str(out),
                   "--", *TINY, f"cache_dir={tmp_path / 'cache'}"])
        summary = json.loads((out / "tune.json").read_text())
        return {m: ([(t["params"], t["dev_score"]) for t in e["trials"]], e["chosen"], e["final"]["1"]["test_score"])
                for m, e in summary["methods"].items()}

    parallel = tuned(tmp_path / "parallel", 2)
    assert set(parallel) == {"loreft", "lora"}
    assert parallel == tuned(tmp_path / "serial", 1)
    assert sorted(p.name for p in (tmp_path / "parallel" / "final").iterdir()) == ["lora", "loreft"]
