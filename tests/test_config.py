"""Every config option composes, and the composed configs are valid for their layer."""
import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from reftbench import methods, tasks
from reftbench.methods.base import _config_from
from reftbench.train import effective_lr

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in ("model", "task", "intervention", "trainer"):
        assert options(group), group


def test_every_option_composes():
    """Each option of each group once, and every model with every method (the pairs whose options
    interact); the full product of 26 tasks would only repeat the task checks."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for task in options("task"):
            cfg = compose("config", overrides=[f"task={task}"])
            assert tasks.build(cfg.task).name == task
        for trainer in options("trainer"):
            cfg = compose("config", overrides=[f"trainer={trainer}"])
            assert effective_lr(cfg.trainer, cfg.intervention) > 0
        for experiment in options("experiment"):
            cfg = compose("config", overrides=[f"experiment={experiment}"])
            tasks.build(cfg.task)
            assert _config_from(cfg.intervention).name == cfg.intervention.name
        for model, iv in itertools.product(options("model"), options("intervention")):
            cfg = compose("config", overrides=[f"model={model}", f"intervention={iv}"])
            assert cfg.model.name == model
            assert _config_from(cfg.intervention).name == iv
            assert cfg.model.source in {"gguf_package", "package", "random", "hub"}


def test_every_intervention_is_registered():
    assert set(options("intervention")) <= set(methods.REGISTRY)


def test_user_facing_overrides_compose():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["intervention.rank=8", "intervention.layers='2;10;18;26'",
                                           "intervention.positions=f3", "intervention.share_weights=false",
                                           "intervention.dropout=0.05", "trainer.epochs=2", "trainer.max_steps=10",
                                           "trainer.lr=1e-3", "trainer.batch_size=4", "trainer.grad_accum=2",
                                           "trainer.weight_decay=0.01", "trainer.warmup_ratio=0.2",
                                           "trainer.max_length=128", "task.train_limit=5", "task.eval_limit=3",
                                           "seed=43"])
    c = _config_from(cfg.intervention)
    assert (c.rank, c.layers, c.positions, c.share_weights) == (8, "2;10;18;26", "f3", False)
    assert cfg.trainer.grad_accum == 2 and cfg.seed == 43


def test_unknown_option_is_rejected_by_hydra():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(Exception, match="rnak"):
            compose("config", overrides=["intervention.rnak=8"])


def test_semicolon_layer_lists_are_quoted_for_hydra():
    from reftbench.cli import quote_semicolons
    assert quote_semicolons(["intervention.layers=2;10;18;26", "seed=1"]) == [
        "intervention.layers='2;10;18;26'", "seed=1"]
    assert quote_semicolons(["intervention.layers=2;10,all"]) == ["intervention.layers='2;10',all"]
    assert quote_semicolons(["intervention.layers=[2,10]"]) == ["intervention.layers=[2,10]"]


def test_hydra_list_syntax_for_layers():
    from reftbench.methods.reft import parse_layers
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["intervention.layers=[3,1]"])
    assert parse_layers(cfg.intervention.layers, 30) == [1, 3]
