"""Plans that cost nothing: parameter counts from shipped architecture files, on the meta device."""
import functools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from reftbench.run import plan

CONF = Path(__file__).resolve().parents[1] / "conf"


def _plan(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return plan(compose("config", overrides=["dry_run=true", *overrides]))


def test_llama7b_loreft_matches_the_paper():
    # Paper, Table 1: LoReFT on LLaMA-7B, rank 8, all 32 layers, f7+l7 tied: 2.097M params, 0.031%.
    p = _plan("model=llama-7b", "intervention.rank=8", "intervention.positions=f7+l7", "intervention.share_weights=true")
    d, r, layers = 4096, 8, 32
    assert p["params"]["trainable"] == layers * (2 * r * d + r) == 2_097_408
    assert p["params"]["base"] == 6_738_415_616
    assert round(p["params"]["percent"], 3) == 0.031


def test_untied_doubles_the_interventions():
    tied = _plan("model=llama2-7b", "intervention.rank=4")["params"]["trainable"]
    untied = _plan("model=llama2-7b", "intervention.rank=4", "intervention.share_weights=false")["params"]["trainable"]
    assert untied == 2 * tied == 2 * 32 * (2 * 4 * 4096 + 4)


@pytest.mark.parametrize("model,base", [("llama-13b", 13_015_864_320), ("llama3-8b", 8_030_261_248),
                                        ("smollm2-135m", 134_515_008)])
def test_shipped_architectures_give_known_sizes(model, base):
    assert _plan(f"model={model}")["params"]["base"] == base


# ---- every table row's experiment file, planned without weights -------------------------------

TABLE_FILES = sorted(p.stem for p in (CONF / "experiment").glob("table*.yaml"))


@functools.lru_cache(maxsize=None)
def _row_plan(name):
    extra = ["task=rte"] if name.startswith("table4") else []  # any GLUE task; the file defaults to sst2
    return _plan(f"experiment={name}", *extra)


def test_each_table_has_its_rows():
    tables = {n.split("_")[0] for n in TABLE_FILES}
    assert tables == {"table1", "table2", "table3", "table4"}
    for method in ("loreft", "lora", "dora"):
        assert f"table1_{method}_llama7b" in TABLE_FILES and f"table1_{method}_llama13b" in TABLE_FILES
    for method in ("loreft", "lora", "red", "bitfit", "full"):
        assert f"table4_{method}_robertabase" in TABLE_FILES


@pytest.mark.parametrize("name,trainable", [
    # LoReFT, rank 8, all layers, tied f7+l7: layers * (2 r d + r)
    ("table1_loreft_llama7b", 32 * (2 * 8 * 4096 + 8)),
    ("table1_loreft_llama13b", 40 * (2 * 8 * 5120 + 8)),
    ("table2_loreft_llama7b", 32 * (2 * 8 * 4096 + 8)),
    # LoRA rank 32 on q, k, v (d -> d), up (d -> ffn), down (ffn -> d): r (in + out) each
    ("table1_lora_llama7b", 32 * 32 * (3 * 2 * 4096 + 2 * (4096 + 11008))),
    ("table1_lora_llama13b", 40 * 32 * (3 * 2 * 5120 + 2 * (5120 + 13824))),
    # DoRA adds one magnitude per output feature of each adapted layer; "half" is rank 16
    ("table1_dora_llama7b", 32 * (32 * (3 * 2 * 4096 + 2 * (4096 + 11008)) + 3 * 4096 + 11008 + 4096)),
    ("table1_dorahalf_llama7b", 32 * (16 * (3 * 2 * 4096 + 2 * (4096 + 11008)) + 3 * 4096 + 11008 + 4096)),
    # Table 3: LoReFT rank 4 on 4 layers, untied f5+l5; RED: scale and bias on 32 FFN outputs;
    # LoRA rank 16 on q and v
    ("table3_loreft_llama2-7b", 2 * 4 * (2 * 4 * 4096 + 4)),
    ("table3_red_llama2-7b", 32 * 2 * 4096),
    ("table3_lora_llama2-7b", 32 * 2 * 16 * (4096 + 4096)),
    # Table 4, RoBERTa-base (12 layers, d 768): LoReFT rank 1, first positions only (one per layer)
    ("table4_loreft_robertabase", 12 * (2 * 1 * 768 + 1)),
    ("table4_loreft_robertalarge", 24 * (2 * 1 * 1024 + 1)),
    ("table4_lora_robertabase", 12 * 2 * 8 * (768 + 768)),
])
def test_table_rows_count_by_hand(name, trainable):
    assert _row_plan(name)["params"]["trainable"] == trainable


def test_table_rows_match_the_papers_parameter_share():
    from reftbench.report import load_paper
    paper = {(p.table, p.model, p.method): p.params_percent for p in load_paper()}
    checked = 0
    for name in TABLE_FILES:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={name}"] + (["task=rte"] if "table4" in name else []))
        key = (cfg.table, cfg.model.name, cfg.row)
        if key not in paper or cfg.row in ("full", "bitfit", "red", "lora") and cfg.table == "table4":
            continue  # GLUE baselines: the paper quotes their own papers' counting
        decimals = len(f"{paper[key]}".split(".")[1])
        p = _row_plan(name)["params"]
        # ours: trainable / (base + added); a few quoted rows (LoRA in Table 3) divide by the base alone
        shares = (p["percent"], 100 * p["trainable"] / p["base"])
        assert min(abs(s - paper[key]) for s in shares) <= 0.6 * 10 ** -decimals, name
        checked += 1
    assert checked >= 14
