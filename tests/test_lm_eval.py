"""A trained run scored by lm-evaluation-harness (`--model reftbench`) on local tasks (a YAML over
tests/fixtures/lm_eval/sums.jsonl, nothing from a hub): loglikelihood and generate_until requests run
with the intervention active, on the prompt (context) positions only."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")  # the optional extra: pip install 'reftbench[lmeval]'

from hydra import compose, initialize_config_dir  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from reftbench.cli import CONF_DIR  # noqa: E402
from reftbench.integrations.lmeval import ReftbenchLM  # noqa: E402
from reftbench.integrations.runs import load_base  # noqa: E402
from reftbench.run import run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "fixtures" / "lm_eval" / "sums.jsonl"
TASKS = {
    "sums_mc": """output_type: multiple_choice
doc_to_text: "{{question}} ="
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
""",
    "sums_gen": """output_type: generate_until
doc_to_text: "{{question}} ="
doc_to_target: " {{answer}}"
generation_kwargs: {until: ["\\n"], max_gen_toks: 5, do_sample: false}
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lmeval")
    tasks = tmp / "tasks"
    tasks.mkdir()
    for name, body in TASKS.items():
        (tasks / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {DATA}\ntest_split: test\n" + body)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny-random-llama", "trainer.max_steps=3", "task.train_limit=12",
                                           "task.eval_limit=2", "trainer.batch_size=4", "eval_batch_size=4",
                                           "eval_frozen=false", "intervention.rank=2", "intervention.positions=f2+l2",
                                           "trainer.lr=5e-2"])
    run(cfg, tmp / "loreft")
    return tmp


def evaluate(lm, tasks_dir, **kwargs):
    # include_defaults=False: indexing lm-eval's own thousands of task files takes ~20 s and none is used
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS), task_manager=manager, log_samples=True,
                                      bootstrap_iters=0, **kwargs)
    return {t: [s["resps"] for s in results["samples"][t]] for t in TASKS}, results["results"]


def test_simple_evaluate_runs_both_request_types_with_the_intervention(setup):
    # by name, as lm-eval's command line does: `--model reftbench --model_args run=RUN_DIR`
    ours, metrics = evaluate("reftbench", setup / "tasks", model_args=f"run={setup / 'loreft'}", device="cpu",
                             batch_size=4)
    assert "acc,none" in metrics["sums_mc"] and "exact_match,none" in metrics["sums_gen"]
    assert isinstance(lm_eval.api.registry.get_model("reftbench")(run=str(setup / "loreft")), ReftbenchLM)
    model, tok, _ = load_base(json.loads((setup / "loreft" / "result.json").read_text()))
    frozen, _ = evaluate(HFLM(pretrained=model, tokenizer=tok, backend="causal", device="cpu", batch_size=4),
                         setup / "tasks")
    loglik = lambda r: [x[0][0] for doc in r["sums_mc"] for x in doc]  # noqa: E731
    assert len(loglik(ours)) == 18 and all(abs(a - b) > 1e-4 for a, b in zip(loglik(ours), loglik(frozen)))
    assert [d[0][0] for d in ours["sums_gen"]] != [d[0][0] for d in frozen["sums_gen"]]


def test_continuation_is_never_intervened_on(setup):
    lm = ReftbenchLM(run=str(setup / "loreft"), device="cpu", batch_size=4)
    context = lm.tok_encode("12 + 30 =")
    requests = [(("12 + 30 =", c), context, lm.tok_encode(c, add_special_tokens=False)) for c in (" 42", " 9", " 420")]
    scores = [s for s, _ in lm._loglikelihood_tokens(requests)]

    def reference(cont, prompt_length):
        ids = torch.tensor([context + cont])
        batch = {"input_ids": ids, "prompt_lengths": [prompt_length], "prompt_offsets": [0]}
        with torch.no_grad(), lm.method.context(batch):
            logp = torch.log_softmax(lm.model(ids[:, :-1]).logits.float(), -1)[0, -len(cont):]
        return float(logp.gather(1, torch.tensor(cont).unsqueeze(1)).sum())
    for (_, _, cont), score in zip(requests, scores):
        assert score == pytest.approx(reference(cont, len(context)), abs=1e-4)
        assert abs(score - reference(cont, len(context) + len(cont) - 1)) > 1e-4  # prompt + continuation would differ

    # generation: the same tokens as our own model.generate inside the method's context
    out = lm.generate_until([type("R", (), {"args": ("7 + 5 =", {"until": ["\n"], "max_gen_toks": 5,
                                                                   "do_sample": False})})()])[0]
    ids = torch.tensor([lm.tok_encode("7 + 5 =")])
    batch = {"input_ids": ids, "prompt_lengths": [ids.shape[1]], "prompt_offsets": [0]}
    with torch.no_grad(), lm.method.context(batch):
        gen = lm.model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    assert out == lm.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]


@pytest.mark.slow  # lm-eval's command line indexes all of its own task files first (~20 s)
def test_command_line(setup, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               HF_DATASETS_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "reftbench.integrations.lmeval", "--model", "reftbench",
                          "--model_args", f"run={setup / 'loreft'}", "--tasks", "sums_mc", "--include_path",
                          str(setup / "tasks"), "--device", "cpu", "--batch_size", "4", "--output_path",
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    found = list((tmp_path / "out").rglob("results*.json"))
    assert found and "sums_mc" in json.loads(found[0].read_text())["results"]


def test_batched_generation_equals_one_by_one(setup):
    """Left-padded batches of prompts of different lengths: each prompt's own positions are intervened on."""
    prompts = ["1 + 2 =", "12 + 30 =", "100 + 250 =", "7 =", "4000 + 1 =", "3 + 3 + 3 ="]
    requests = [type("R", (), {"args": (p, {"until": ["\n"], "max_gen_toks": 5, "do_sample": False})})()
                for p in prompts]
    batched = ReftbenchLM(run=str(setup / "loreft"), device="cpu", batch_size=6).generate_until(requests)
    single = ReftbenchLM(run=str(setup / "loreft"), device="cpu", batch_size=1).generate_until(requests)
    assert batched == single
