"""task.protocol=llm_adapters: LLM-Adapters' prompts (finetune.py, commonsense_evaluate.py,
evaluate.py), its loss on prompt and answer, and its first-match answer extraction."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from reftbench import tasks
from reftbench.errors import ConfigError
from reftbench.models import char_tokenizer
from reftbench.objectives import Generation

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "llm-adapters"
S = " " * 16
# LLM-Adapters finetune.py generate_prompt (training, the output included) and commonsense_evaluate.py /
# evaluate.py generate_prompt (evaluation), written out: their whitespace differs and both are kept.
TRAIN = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
         f"request.  \n\n{S}### Instruction:\n{S}Q?\n{S}\n{S}### Response:\n{S}the correct answer is true")
TRAIN_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
               f"Write a response that appropriately completes the request. \n\n{S}### Instruction:\n{S}Q?\n{S}\n"
               f"{S}### Input:\n{S}I.\n{S}\n{S}### Response:\n{S}the correct answer is true")
EVAL = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
        f"request. \n\n{S}### Instruction:\n{S}Q?\n\n{S}### Response:\n{S}")
EVAL_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              f"Write a response that appropriately completes the request.\n\n{S}### Instruction:\n{S}Q?\n\n"
              f"{S}### Input:\n{S}I.\n\n{S}### Response:\n{S}")
REC = {"instruction": "Q?", "input": "", "output": "the correct answer is true", "answer": "true"}


def task(name, protocol="llm_adapters", **over):
    cfg = OmegaConf.load(ROOT / "conf" / "task" / f"{name}.yaml")
    cfg.protocol = protocol
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return tasks.build(cfg)


@pytest.mark.parametrize("name", ["commonsense", "boolq", "math", "gsm8k", "aqua"])
def test_templates_are_llm_adapters_own(name):
    t = task(name)
    assert t.train_text(REC) == TRAIN and t.train_text(dict(REC, input="I.")) == TRAIN_INPUT
    assert t.prompt(REC) == EVAL and t.prompt(dict(REC, input="I.")) == EVAL_INPUT
    assert t.generation == {"num_beams": 4}  # commonsense_evaluate.py / evaluate.py defaults
    assert t.max_new_tokens == (256 if name in ("math", "gsm8k", "aqua") else 32)


def test_loss_covers_prompt_and_answer():
    tok = char_tokenizer()
    llm = Generation(task("boolq"), tok, 512).encode([REC])[0]
    whole = tok(TRAIN)["input_ids"] + [tok.eos_token_id]
    assert list(llm["input_ids"]) == whole and list(llm["labels"]) == whole  # every token, the prompt's included
    reft = Generation(task("boolq", protocol="reft"), tok, 512).encode([REC])[0]
    assert list(reft["labels"][:reft["prompt_length"]]) == [-100] * reft["prompt_length"]  # ReFT: the answer only
    # cut at cutoff_len like LLM-Adapters: no EOS where there is no room, never dropped
    stats = {}
    short = Generation(task("boolq"), tok, 40).encode([REC], stats)[0]
    assert list(short["input_ids"]) == tok(TRAIN)["input_ids"][:40] == list(short["labels"])
    assert stats["train_dropped_too_long"] == 0 and stats["train_truncated"] == 1


@pytest.mark.parametrize("set_,output,answer,correct", [
    ("boolq", "the correct answer is true", "true", True),
    ("boolq", "true, the correct answer is false", "false", False),     # the first match counts
    ("piqa", "The correct answer is solution2. Solution1 would not work", "solution2", True),  # text after it is fine
    ("siqa", "answer3", "answer3", True),
    ("hellaswag", "the correct answer is ending4\n\n### Response:\nending1", "ending4", True),
    ("hellaswag", "### Response: the correct answer is ending4", "ending4", False),  # cut at a second prompt
    ("winogrande", "the correct answer is option1", "option2", False),
    ("arc-c", "the correct answer is", "answer1", False),
    ("obqa", "Answer2 is the correct answer is answer4", "answer4", True),  # labels are case-sensitive
])
def test_first_match_extraction_per_set(set_, output, answer, correct):
    t = task("commonsense")
    assert t.answer == "first_match"
    assert t.is_correct(output, {"eval_task": set_, "answer": answer}) is correct


def test_reft_protocol_checks_the_text_after_the_trigger_exactly():
    t = task("commonsense", protocol="reft")
    assert t.is_correct("the correct answer is true", {"eval_task": "boolq", "answer": "true"})
    assert not t.is_correct("the correct answer is true, surely", {"eval_task": "boolq", "answer": "true"})


def test_unknown_protocol_or_a_task_without_it_is_one_line():
    with pytest.raises(ConfigError, match="task.protocol='alpaca' is unknown"):
        task("boolq", protocol="alpaca")
    with pytest.raises(ConfigError, match="task=alpaca has no llm_adapters protocol"):
        task("alpaca")


def test_the_papers_lora_and_dora_rows_run_llm_adapters_protocol():
    conf = ROOT / "conf" / "experiment"
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for f in sorted(conf.glob("table[12]_*.yaml")):
            cfg = compose("config", overrides=[f"experiment={f.stem}"])
            want = "llm_adapters" if cfg.row.startswith(("lora", "dora")) else "reft"
            assert cfg.task.protocol == want, f.stem


def test_a_run_under_llm_adapters_protocol_trains_decodes_with_beams_and_is_labelled(tmp_path):
    from reftbench import report
    from reftbench.run import run
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=table1_lora_llama7b", "model=tiny-random-llama",
                                           f"task.data_dir={FIX}", "task.eval_limit=1", "task.protocols.llm_adapters.max_new_tokens=2",
                                           "trainer.max_steps=1", "trainer.batch_size=2", "eval_frozen=false",
                                           "intervention.rank=2", "save_intervention=false"])
    rec = run(cfg, tmp_path)
    assert rec["config"]["task"]["protocol"] == "llm_adapters" and len(rec["metrics"]["trained"]["by_task"]) == 8
    rows = report.tables([rec])["table1"]
    mine = [r for r in rows if r["model"] == "tiny-random-llama"]
    assert mine and all(r["protocol"] == "llm_adapters" for r in mine)
    md = report.markdown(rows)
    assert "| protocol |" in md.splitlines()[0] and "| llm_adapters |" in md
    assert "lora [llm_adapters]" in report.markdown_wide(rows)
