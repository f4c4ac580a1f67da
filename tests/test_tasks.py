"""Task configs: exact prompt strings, loading from fixtures and (when present) ../shared/data,
one-line errors for bad data, and the paper's presets."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from reftbench import tasks
from reftbench.errors import ReftbenchError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FIX = Path(__file__).resolve().parent / "fixtures"
SHARED = ROOT.parent / "shared" / "data"

COMMONSENSE = ["boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc-e", "arc-c", "obqa"]
ARITHMETIC = ["gsm8k", "aqua", "mawps", "svamp"]
INSTRUCTION = ["alpaca", "ultrafeedback"]
GLUE = {"cola": "CoLA", "mnli": "MNLI", "mrpc": "MRPC", "qnli": "QNLI", "qqp": "QQP", "rte": "RTE",
        "sst2": "SST-2", "stsb": "STS-B"}
GENERATION = COMMONSENSE + ["commonsense"] + ARITHMETIC + ["math"] + INSTRUCTION

# The exact strings of stanfordnlp/pyreft examples/loreft/templates.py (alpaca_prompt_no_input_template,
# alpaca_prompt_template) and task_config.py (commonsense: "%s\n"), written out in full.
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                   "completes the request.\n\n### Instruction:\nQ?\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\nQ?"
                "\n\n### Input:\nI.\n\n### Response:\n")


def task(name, **over):
    cfg = OmegaConf.load(CONF / "task" / f"{name}.yaml")
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return tasks.build(cfg)


def fixture_task(name, **over):
    data_dir = FIX / "glue" / GLUE[name] if name in GLUE else FIX / "llm-adapters"
    return task(name, data_dir=str(data_dir), **over)


def test_every_task_is_declared():
    declared = {p.stem for p in (CONF / "task").glob("*.yaml")}
    assert set(GENERATION) | set(GLUE) <= declared
    for name in declared:
        t = task(name)
        assert t.name == name and isinstance(t.version, int) and t.version >= 1
        if name in GENERATION:
            assert t.hub and set(t.hub) <= set(t.files), name  # every hub role has a local file too


@pytest.mark.parametrize("name", COMMONSENSE + ["commonsense"])
def test_commonsense_template_and_target(name):
    t = task(name)
    r = {"instruction": "Q?", "input": "", "output": "the correct answer is answer1", "answer": "answer1"}
    assert t.prompt(r) == "Q?\n"
    assert t.target_text(r) == "the correct answer is answer1"  # EOS is added by the tokenizer step
    assert (t.max_new_tokens, t.generation, t.answer) == (32, {}, "trigger_exact")
    assert t.is_correct("the correct answer is answer1", r) and not t.is_correct("the correct answer is answer2", r)


@pytest.mark.parametrize("name", ARITHMETIC + ["math"])
def test_arithmetic_template_and_target(name):
    t = task(name)
    r = {"instruction": "Q?", "input": "", "output": "\nA: 2 + 2 = 4.\nThe answer is 4.", "answer": "4.0"}
    assert t.prompt(r) == ALPACA_NO_INPUT
    assert t.prompt(dict(r, input="ignored")) == ALPACA_NO_INPUT  # pyreft's math prompt has no input
    assert t.target_text(r) == "\nA: 2 + 2 = 4.\nThe answer is 4."
    assert t.max_new_tokens == 512 and t.generation == {}
    assert t.answer == {"aqua": "letter", "math": "math"}.get(name, "number")


@pytest.mark.parametrize("name", INSTRUCTION)
def test_instruction_template_and_generation(name):
    t = task(name)
    assert t.prompt({"instruction": "Q?", "input": ""}) == ALPACA_NO_INPUT
    assert t.prompt({"instruction": "Q?"}) == ALPACA_NO_INPUT
    assert t.prompt({"instruction": "Q?", "input": "I."}) == ALPACA_INPUT
    assert t.target_text({"output": "Sure."}) == "Sure."
    assert t.generation == {"no_repeat_ngram_size": 5, "repetition_penalty": 1.1}
    assert t.metric == "alpaca_eval" and t.answer == "none"


@pytest.mark.parametrize("name", GLUE)
def test_glue_declaration(name):
    t = task(name)
    assert t.kind == "classification" and t.family == "glue"
    assert t.metric == {"cola": "matthews_correlation", "stsb": "pearson"}.get(name, "accuracy")
    assert t.num_labels == {"mnli": 3, "stsb": 1}.get(name, 2)
    assert t.hub["train"]["path"] == "nyu-mll/glue" and t.hub["train"]["name"] == name
    assert t.hub["validation"]["split"] == ("validation_matched" if name == "mnli" else "validation")


@pytest.mark.parametrize("name", COMMONSENSE + ARITHMETIC + INSTRUCTION)
def test_loads_from_fixture(name):
    t = fixture_task(name)
    train, test = t.load(seed=42)
    assert len(train) == {"ultrafeedback": 4}.get(name, 8 if name in COMMONSENSE else 2) and len(test) == 2
    for r in train:
        assert t.prompt(r) and t.target_text(r)
    if t.answer != "none":  # the gold output of a commonsense record passes its own check
        assert all(t.is_correct(f"the correct answer is {r['answer']}", r) for r in test) or name not in COMMONSENSE


@pytest.mark.parametrize("name,sets", [("commonsense", COMMONSENSE), ("math", ARITHMETIC)])
def test_umbrella_tasks_tag_each_test_set(name, sets):
    t = fixture_task(name, eval_limit=1)
    train, test = t.load(seed=0)
    assert [r["eval_task"] for r in test] == sets  # eval_limit applies to each set
    assert len(train) == (8 if name == "commonsense" else 2)


@pytest.mark.parametrize("name", GLUE)
def test_glue_loads_from_fixture(name):
    t = fixture_task(name)
    splits = t.load_splits(seed=42)
    train, test = t.load(seed=42)
    assert len(train) == len(splits["train"]) >= 2
    n_val = {"mnli": 4, "cola": 4, "sst2": 4}.get(name, 2)
    assert len(splits["select"]) == n_val // 2 and len(splits["test"]) == n_val - n_val // 2 == len(test)
    for r in train + test:
        assert set(r) == {"text", "text_pair", "label"} and r["text"]
        assert (r["text_pair"] is None) == (name in ("cola", "sst2"))
        assert isinstance(r["label"], float if name == "stsb" else int)
        assert name == "stsb" or 0 <= r["label"] < t.num_labels


def test_glue_label_strings_follow_the_hub_order():
    train = fixture_task("mnli").load_splits(0)["train"]
    assert [r["label"] for r in train] == [0, 2, 1]  # entailment, contradiction, neutral
    assert fixture_task("stsb").load_splits(0)["train"][0]["label"] == 5.0
    assert fixture_task("sst2").load_splits(0)["train"][3]["text"] == 'a "comedy" without a single laugh '


def test_limits():
    t = fixture_task("boolq", train_limit=3, eval_limit=1)
    train, test = t.load(0)
    assert len(train) == 3 and len(test) == 1
    assert t.load(1)[0] == train  # the training subset does not depend on the run seed


@pytest.mark.parametrize("n_train,n_eval", [(50, 200), (1000, 200)])
def test_generated_task_keeps_its_train_limit_and_never_its_test_questions(n_train, n_eval):
    """reasoning-gym's seed 1 stream is seed 0's shifted by one: the test questions are the first training
    candidates, and a train_limit below eval_limit used to leave almost nothing to train on."""
    t = task("chain-sum", train_limit=n_train, eval_limit=n_eval)
    train, test = t.load(0)
    assert len(train) == n_train and len(test) == n_eval
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    if n_train == 1000:  # the default split is what it always was: 2000 candidates, test questions dropped
        import reasoning_gym as rg
        held_out = {r["question"] for r in test}
        old = [x["question"] for x in rg.create_dataset("chain_sum", size=2000, seed=0, **t.options["generator"])
               if x["question"] not in held_out][:n_train]
        assert [r["question"] for r in train] == old


# ---- errors: one line naming the file and what was expected ----

def test_missing_data_dir_and_offline_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ReftbenchError, match="task.data_dir") as e:
        task("sst2").load(0)  # no data_dir: the hub, which is unreachable offline
    assert "\n" not in str(e.value)
    with pytest.raises(ReftbenchError, match="set task.data_dir") as e:
        task("boolq", hub={}).load(0)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("file,needle", [
    ("missing.json", "missing.json is missing"),
    ("bad/not_json.json", "not_json.json is not valid JSON"),
    ("bad/missing_keys.json", "missing_keys.json must be a JSON list of records with keys answer, instruction"),
    ("bad/dict.json", "dict.json must be a JSON list"),
])
def test_bad_json_files(file, needle):
    t = task("gsm8k", data_dir=str(FIX), files={"train": "llm-adapters/math_10k/train.json", "test": file})
    with pytest.raises(ReftbenchError, match=needle) as e:
        t.load(0)
    assert "\n" not in str(e.value)


def test_bad_tsv_files():
    t = task("sst2", data_dir=str(FIX / "glue" / "bad"))
    with pytest.raises(ReftbenchError, match=r"train.tsv must have the columns sentence, label; it has text, label"):
        t.load(0)
    t = task("sst2", data_dir=str(FIX / "glue" / "bad"), files={"train": "dev.tsv", "validation": "dev.tsv"})
    with pytest.raises(ReftbenchError, match=r"dev.tsv: label 'positive' is not"):
        t.load(0)
    with pytest.raises(ReftbenchError, match="nothing.tsv is missing"):
        task("sst2", data_dir=str(FIX / "glue" / "bad"), files={"train": "nothing.tsv"}).load(0)


# ---- the real data in ../shared/data, when this checkout has it ----

LLM = SHARED / "llm-adapters"
needs_llm = pytest.mark.skipif(not LLM.is_dir(), reason="../shared/data/llm-adapters is absent")
REAL = {"boolq": 3270, "piqa": 1838, "siqa": 1954, "winogrande": 1267, "arc-e": 2376, "obqa": 500,
        "gsm8k": 1319, "aqua": 254, "mawps": 238, "svamp": 1000}


@needs_llm
@pytest.mark.parametrize("name,n", REAL.items())
def test_loads_shared_data(name, n):
    train_file = "boolq/train.json" if name in COMMONSENSE else "ft-training_set/math_data.json"
    t = task(name, data_dir=str(LLM), **{"files.train": train_file})
    train, test = t.load(seed=42)
    assert len(test) == n and len(train) == (9427 if name in COMMONSENSE else 3260)
    if name in COMMONSENSE:  # LLM-Adapters' own output field passes pyreft's check on every record
        assert all(t.is_correct(r["output"], r) for r in test)
        assert t.prompt(test[0]) == test[0]["instruction"] + "\n"
    else:
        assert t.prompt(test[0]).startswith("Below is an instruction") and t.prompt(test[0]).endswith(
            test[0]["instruction"] + "\n\n### Response:\n")
        if name == "aqua":
            assert {r["answer"] for r in test} <= set("ABCDE")
        else:
            assert all(isinstance(float(r["answer"]), float) for r in test)


@needs_llm
def test_shared_math_outputs_score_like_a_model():
    """LLM-Adapters ships GPT-3.5 chain-of-thought outputs: scored by pyreft's rule, most are right."""
    t = task("gsm8k", data_dir=str(LLM), **{"files.train": "ft-training_set/math_data.json"})
    train, _ = t.load(0)
    acc = sum(t.is_correct(r["output"], r) for r in train) / len(train)
    assert 0.5 < acc <= 1.0


SST2 = SHARED / "glue" / "SST-2"


@pytest.mark.skipif(not SST2.is_dir(), reason="../shared/data/glue/SST-2 is absent")
def test_loads_shared_sst2():
    # alps' re-split: train.tsv + dev.tsv = GLUE's training set, test.tsv = GLUE's validation set
    t = task("sst2", data_dir=str(SST2), files={"train": ["train.tsv", "dev.tsv"], "validation": "test.tsv"})
    s = t.load_splits(seed=42)
    assert len(s["train"]) == 67349 and (len(s["select"]), len(s["test"])) == (436, 436)
    assert {r["label"] for r in s["train"]} == {0, 1}


# ---- presets ----

def _experiment_override(name):
    # `experiment=` needs `- optional experiment: null` in conf/config.yaml's defaults; else `+experiment=`
    listed = any("experiment" in str(d) for d in OmegaConf.load(CONF / "config.yaml").defaults)
    return f"{'' if listed else '+'}experiment={name}"


COMMON = dict(layers="all", share_weights=True, dropout=0.0, rank=8, positions="f7+l7")
PAPER = {
    "commonsense": ("commonsense", None, COMMON, dict(lr=9e-4, epochs=6, batch_size=16, grad_accum=2, max_length=512,
                                                       warmup_ratio=0.1, weight_decay=0.0), [42, 43, 44]),
    "arithmetic": ("math", None, COMMON, dict(lr=9e-4, epochs=12, batch_size=16, grad_accum=2, max_length=512,
                                               warmup_ratio=0.1, weight_decay=0.0), [42, 43, 44]),
    "ultrafeedback": ("ultrafeedback", None, dict(rank=4, layers="3;9;18;24", positions="f5+l5", share_weights=False),
                      dict(lr=9e-4, epochs=9, batch_size=4, grad_accum=32, max_length=768, weight_decay=0.0),
                      [42, 43, 44]),
}
for _t, _p, _lr, _ep, _do in [("mnli", "f1", 6e-4, 40, 0.05), ("sst2", "f3", 6e-4, 40, 0.10), ("mrpc", "f3", 3e-4, 40, 0.05),
                              ("cola", "f3", 4e-4, 60, 0.20), ("qnli", "f11", 9e-4, 20, 0.05), ("qqp", "f11", 6e-4, 40, 0.05),
                              ("rte", "f3", 9e-4, 60, 0.05), ("stsb", "f3", 6e-4, 60, 0.05)]:
    PAPER[f"glue-{_t}"] = (_t, "roberta-base", dict(rank=1, layers="all", positions=_p, share_weights=False, dropout=_do),
                           dict(lr=_lr, epochs=_ep, batch_size=32, grad_accum=1, weight_decay=0.0), [42, 43, 44, 45, 46])


def test_every_preset_is_checked():
    # table rows: tests/test_dry_run.py and test_table_rows_agree_with_the_presets; mini: the README run;
    # finegates_*: tests/test_finegates.py and test_finegates_presets_compose_for_every_glue_task below
    presets = {p.stem for p in (CONF / "experiment").glob("*.yaml") if not p.stem.startswith(("table", "mini_", "finegates_"))}
    assert presets == set(PAPER)
    for p in (CONF / "experiment").glob("*.yaml"):
        assert p.read_text().startswith("# @package _global_\n"), p.name


def test_presets_compose_with_the_papers_values():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name, (task_name, model, iv, tr, seeds) in PAPER.items():
            cfg = compose("config", overrides=[_experiment_override(name)])
            assert cfg.task.name == task_name and tasks.build(cfg.task).name == task_name, name
            if model:
                assert cfg.model.name == model
            for k, v in iv.items():
                assert cfg.intervention[k] == v, (name, k)
            for k, v in tr.items():
                assert cfg.trainer[k] == pytest.approx(v), (name, k)
            assert cfg.intervention.lr is None and cfg.trainer.max_steps is None
            assert list(cfg.seeds) == seeds
        # the user's overrides still win
        cfg = compose("config", overrides=[_experiment_override("commonsense"), "trainer.lr=1e-3", "model=llama-7b"])
        assert cfg.trainer.lr == 1e-3 and cfg.model.name == "llama-7b" and cfg.intervention.rank == 8


def test_config_mistakes_are_one_line():
    from reftbench.errors import ConfigError
    with pytest.raises(ConfigError, match="answer_args.labels"):
        task("commonsense", answer="first_match")
    assert task("boolq", answer="first_match").is_correct("the correct answer is true, because", {"answer": "true"})
    with pytest.raises(ConfigError, match="task.kind='seq2seq' is unknown"):
        task("boolq", kind="seq2seq")
    with pytest.raises(ConfigError, match="sst2 is a classification task"):
        task("sst2").prompt({"text": "x"})


@pytest.mark.parametrize("row,preset,tasks_", [
    ("table1_loreft_llama7b", "commonsense", [None]), ("table1_loreft_llama13b", "commonsense", [None]),
    ("table2_loreft_llama7b", "arithmetic", [None]), ("table3_loreft_llama2-7b", "ultrafeedback", [None]),
    ("table4_loreft_robertabase", "glue-{}", ["mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb"]),
])
def test_table_rows_agree_with_the_presets(row, preset, tasks_):
    """A LoReFT table row trains exactly as the paper's preset does (GLUE: task by task)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for t in tasks_:
            extra = [f"task={t}"] if t else []
            a = compose("config", overrides=[f"experiment={row}", *extra])
            b = compose("config", overrides=[f"experiment={preset.format(t)}", *extra])
            OmegaConf.resolve(a)
            assert a.task.name == b.task.name and a.intervention.name == "loreft"
            assert dict(a.intervention) == dict(b.intervention), (row, t)
            assert dict(a.trainer) == dict(b.trainer), (row, t)


@pytest.mark.parametrize("preset", ["finegates_glue_robertabase", "finegates_glue_robertalarge"])
def test_finegates_presets_compose_for_every_glue_task(preset):
    """The authors' GLUE defaults (spec section 4.1) reach the method and the loop for each GLUE task."""
    from reftbench.train import effective_lr
    gate_defaults = OmegaConf.load(CONF / "intervention" / "finegates.yaml")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for task in ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb"):
            cfg = compose("config", overrides=[f"experiment={preset}", f"task={task}"])
            assert cfg.task.name == task and cfg.intervention.name == "finegates"
            assert cfg.model.name == preset.rsplit("_", 1)[1].replace("roberta", "roberta-")
            for key in ("sparsity_weight", "target_sparsity", "noise_std", "reg_std", "train_bias"):
                assert cfg.intervention[key] == gate_defaults[key], key
            assert effective_lr(cfg.trainer, cfg.intervention) == 1e-3
            assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.max_length) == (100, 16, 512)


@pytest.mark.parametrize("row,count", [("a fine film\t1\textra", 3), ("no label here", 1)])
def test_a_tsv_row_with_other_than_the_header_columns_is_one_line_naming_file_and_line(tmp_path, row, count):
    (tmp_path / "train.tsv").write_text(f"sentence\tlabel\nit is good\t1\n{row}\nbad\t0\n")
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    with pytest.raises(ReftbenchError) as e:
        task("sst2", data_dir=str(tmp_path)).load(0)
    msg = str(e.value)
    assert f"{tmp_path / 'train.tsv'} line 3: {count} columns, expected 2" in msg and "\n" not in msg
