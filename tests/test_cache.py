"""The frozen model is scored once per (weights, task, test set, generation settings), and training
data is tokenised once per (tokenizer, task version, max_length, data), across the runs of a sweep."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import tiny_llama
from reftbench import cache, cli, data, objectives
from reftbench.run import run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny-random-llama", "trainer.max_steps=1", "task.train_limit=16", "task.eval_limit=4",
        "trainer.batch_size=4", "eval_batch_size=8", "save_intervention=false", "task.max_new_tokens=4"]


def config(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*TINY, *overrides])


def count_frozen_passes(monkeypatch) -> list:
    calls = []
    real = objectives.Generation.evaluate

    def counted(self, model, records, batch_size, method=None, desc="eval"):
        if method is None:
            calls.append(len(records))
        return real(self, model, records, batch_size, method=method, desc=desc)

    monkeypatch.setattr(objectives.Generation, "evaluate", counted)
    return calls


def test_a_sweep_of_methods_and_settings_scores_the_frozen_model_once(monkeypatch, tmp_path):
    passes = count_frozen_passes(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["reftbench", "-m", *TINY, "intervention=loreft,red", "trainer.lr=0.001,0.002",
                                      f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    cli.main()
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/result.json"))]
    assert len(records) == 4 and passes == [4]  # four runs, one frozen evaluation pass
    sources = [r["cache"]["frozen_score"] for r in records]
    assert sorted(s["from"] for s in sources) == ["cache", "cache", "cache", "computed"]
    assert len({s["file"] for s in sources}) == 1 and Path(sources[0]["file"]).parent == tmp_path / "cache" / "frozen"
    assert all(r["metrics"]["frozen"] == records[0]["metrics"]["frozen"] for r in records)


def test_what_the_frozen_score_depends_on_changes_its_key(tmp_path):
    from reftbench import models, tasks

    def key(*overrides):
        cfg = config(*overrides)
        task = tasks.build(cfg.task)
        loaded = models.load(cfg.model, seed=int(cfg.seed))
        objective = objectives.Generation(task, loaded.tokenizer, cfg.trainer.max_length)
        return cache.digest(cache.frozen_key(cfg, loaded.model, objective, task.load_splits(int(cfg.seed))["test"]))

    base = key()
    # what the untrained model does not see: same key
    assert key("intervention=red", "trainer.lr=0.01", "trainer.max_steps=9", "task.train_limit=8") == base
    # a random model's seed is its weights; the test set, generation and numerics settings
    for change in ("seed=7", "task.eval_limit=3", "task.max_new_tokens=5", "task.template='Q: {question}'",
                   "eval_batch_size=2", "model.dtype=float64", "model.architecture.intermediate_size=96"):
        assert key(change) != base, change


def test_a_run_with_the_cache_off_scores_the_frozen_model_itself(monkeypatch, tmp_path):
    passes = count_frozen_passes(monkeypatch)
    where = f"cache_dir={tmp_path / 'cache'}"
    first = run(config(where), tmp_path / "a")
    off = run(config(where, "cache=false"), tmp_path / "b")
    assert first["cache"]["frozen_score"]["from"] == "computed" and len(passes) == 2
    assert off["cache"] == {"frozen_score": {"from": "computed", "file": None},
                            "train_tokens": {"from": "computed", "file": None}}
    assert off["metrics"]["frozen"] == first["metrics"]["frozen"]


def test_weights_fingerprint_follows_the_weights():
    a, b = tiny_llama(seed=0).model, tiny_llama(seed=0).model
    assert cache.weights_fingerprint(a) == cache.weights_fingerprint(b)
    assert cache.weights_fingerprint(a) != cache.weights_fingerprint(tiny_llama(seed=1).model)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3  # one element, most likely not in the sample
    assert cache.weights_fingerprint(a) != cache.weights_fingerprint(b)


def test_a_second_run_does_not_tokenise_the_training_data(monkeypatch, tmp_path):
    calls = []
    real = data.encode_example

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(objectives, "encode_example", counted)
    where = f"cache_dir={tmp_path / 'cache'}"
    first = run(config(where, "eval_frozen=false"), tmp_path / "a")
    assert len(calls) == 16 and first["cache"]["train_tokens"]["from"] == "computed"
    second = run(config(where, "eval_frozen=false", "seed=3", "intervention=red"), tmp_path / "b")
    assert len(calls) == 16 and second["cache"]["train_tokens"] == {"from": "cache",
                                                                    "file": first["cache"]["train_tokens"]["file"]}
    third = run(config(where, "eval_frozen=false", "trainer.max_length=200"), tmp_path / "c")
    assert len(calls) == 32 and third["cache"]["train_tokens"]["from"] == "computed"


@pytest.mark.parametrize("examples", [
    [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "prompt_length": 1}, {"input_ids": [8], "labels": [8],
                                                                             "prompt_length": 0}],
    [{"input_ids": [1, 2], "label": 0.25, "prompt_length": 2}],
])
def test_cached_examples_read_back_exactly(tmp_path, examples):
    cache._save_examples(tmp_path / "x.npz", examples)
    back = cache._load_examples(tmp_path / "x.npz")
    assert back.as_lists() == examples
    assert all(type(v) is type(examples[0][k]) for k, v in back.as_lists()[0].items())  # 0.25 stays a float, 1 an int
    assert cache._load_examples(tmp_path / "missing.npz") is None


def test_examples_are_held_as_flat_int32_arrays():
    """No Python int list per example: one int32 array per field and one offsets array, sliced as views."""
    examples = [{"input_ids": list(range(n)), "labels": [-100] * n, "prompt_length": n, "truncated": n > 3}
                for n in (2, 5, 3)]
    table = data.Examples.build(iter(examples))
    assert table.ragged["input_ids"].dtype == np.int32 and table.offsets.tolist() == [0, 2, 7, 10]
    assert isinstance(table[1]["input_ids"], np.ndarray) and table[1]["input_ids"].base is not None  # a view
    assert table[1:].as_lists() == examples[1:] and table[-1]["truncated"] is False and len(table[:0]) == 0
    batch, plain = data.collate_train(table, 0), data.collate_train(examples, 0)
    assert all(torch.equal(batch[k], plain[k]) for k in ("input_ids", "labels", "attention_mask"))
    assert batch["prompt_lengths"] == [2, 5, 3]


def test_a_changed_scoring_function_misses_the_frozen_cache(monkeypatch, tmp_path):
    """The key holds the code that scores: a new answer check or scoring rule must not be served the
    frozen score the old code computed (the package version does not change with it)."""
    from reftbench import evaluate
    where = f"cache_dir={tmp_path / 'cache'}"
    first = run(config(where), tmp_path / "a")
    again = run(config(where), tmp_path / "b")
    assert first["cache"]["frozen_score"]["from"] == "computed" and again["cache"]["frozen_score"]["from"] == "cache"
    real = evaluate.score

    def stricter(task, records, outputs):  # a new scoring rule: only the non-empty outputs count
        return real(task, records, [o if o.strip() else "\0" for o in outputs])

    monkeypatch.setattr(evaluate, "score", stricter)
    patched = run(config(where), tmp_path / "c")
    assert patched["cache"]["frozen_score"]["from"] == "computed"
    assert patched["cache"]["frozen_score"]["file"] != first["cache"]["frozen_score"]["file"]


def test_a_changed_encoder_misses_the_token_cache(monkeypatch, tmp_path):
    where = f"cache_dir={tmp_path / 'cache'}"
    first = run(config(where, "eval_frozen=false"), tmp_path / "a")
    assert first["cache"]["train_tokens"]["from"] == "computed"
    real = data.encode_example

    def without_eos(tok, prompt, target, max_length):  # a new encoding: no EOS after the answer
        e = real(tok, prompt, target, max_length)
        return e and dict(e, input_ids=e["input_ids"][:-1], labels=e["labels"][:-1])

    monkeypatch.setattr(objectives, "encode_example", without_eos)
    patched = run(config(where, "eval_frozen=false"), tmp_path / "b")
    assert patched["cache"]["train_tokens"]["from"] == "computed"
    assert patched["cache"]["train_tokens"]["file"] != first["cache"]["train_tokens"]["file"]


def test_the_frozen_key_holds_the_precision_and_generation_config(tmp_path):
    from reftbench import models, tasks
    cfg = config()
    task = tasks.build(cfg.task)
    loaded = models.load(cfg.model, seed=int(cfg.seed))
    objective = objectives.Generation(task, loaded.tokenizer, cfg.trainer.max_length)
    records = task.load_splits(int(cfg.seed))["test"]
    base = cache.digest(cache.frozen_key(cfg, loaded.model, objective, records))
    assert cache.digest(cache.frozen_key(config("trainer.precision=fp32"), loaded.model, objective, records)) == base
    assert cache.digest(cache.frozen_key(config("trainer.precision=bf16-mixed"), loaded.model, objective,
                                         records)) != base
    loaded.model.generation_config.repetition_penalty = 1.3
    assert cache.digest(cache.frozen_key(cfg, loaded.model, objective, records)) != base


def test_the_token_cache_key_covers_every_encoding_setting():
    """Tokens made with the loss on the prompt (LLM-Adapters) or another training template must never be
    handed to a run that encodes differently, even where the prompt template is the same."""
    import dataclasses
    from types import SimpleNamespace

    from omegaconf import OmegaConf
    from reftbench import tasks
    from reftbench.cache import tokens_key
    from reftbench.models import char_tokenizer
    task = tasks.build(OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "task" / "boolq.yaml"))
    key = lambda t: tokens_key(SimpleNamespace(task=t, tok=char_tokenizer(), max_length=64), [{"x": 1}])
    base = key(task)
    for change in ({"loss_on_prompt": True}, {"train_template": "{instruction} {answer}"}, {"protocol": "llm_adapters"}):
        assert key(dataclasses.replace(task, **change)) != base, change
