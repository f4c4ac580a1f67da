"""pyreft interop: `methods.load` reads a folder saved by pyreft's `ReftModel.save`, and
`save_pyreft` writes ours in that format (../shared/fixtures/pyreft: saved-* folders + their outputs)."""
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from reftbench import methods
from reftbench.errors import ConfigError
from reftbench.integrations import pyreft
from reftbench.interventions import INTERVENTIONS

from conftest import method_cfg, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("REFTBENCH_PYREFT_FIXTURES") or ROOT.parent / "shared" / "fixtures" / "pyreft")
SAVED = sorted(p.parent.name for p in FIXTURES.glob("*/expected.json"))
needs_fixtures = pytest.mark.skipif(not SAVED, reason=f"no pyreft saved interventions under {FIXTURES}")


def _expected(name):
    return json.loads((FIXTURES / name / "expected.json").read_text())


@pytest.fixture(scope="module")
def fixture_model():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(FIXTURES / "tiny-llama").eval()


def _logits(model, method, input_ids, attention_mask, prompt_lengths):
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_lengths": prompt_lengths,
             "prompt_offsets": [0] * len(prompt_lengths)}
    with torch.no_grad(), method.context(batch):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


@needs_fixtures
@pytest.mark.parametrize("name", SAVED)
def test_load_pyreft_folder_reproduces_pyreft_logits(name, fixture_model):
    from safetensors.torch import load_file
    exp = _expected(name)
    io = exp["inputs_and_expected"]
    tensors = load_file(str((FIXTURES / name / io["file"]).resolve()))
    forward = json.loads((FIXTURES / "forward.json").read_text())
    method = methods.load(FIXTURES / name, fixture_model, positions=exp["position"])
    try:
        assert method.config.name == pyreft.our_name(exp["pyreft_class"])
        assert method.config.share_weights == exp["share_weights"] and method.layer_ids == exp["layers"]
        for file, info in exp["bin_files"].items():  # the fp32 values as saved, not rounded to bf16
            saved = torch.load(FIXTURES / name / file, weights_only=True)
            iv = method.interventions[f"layer{info['layer']}_{_group(info['pyvene_key'], exp['share_weights'])}"]
            assert torch.equal(iv.W.weight, saved["weight"]) and torch.equal(iv.W.bias, saved["bias"])
            assert torch.equal(iv.R, saved["rotate_layer"].T)
        plain = io["plain"]
        mask = tensors[plain["attention_mask"]].bool()
        logits = _logits(fixture_model, method, tensors[plain["input_ids"]], tensors[plain["attention_mask"]],
                         forward["prompt_lengths"])
        assert (logits - tensors[plain["logits"]])[mask].abs().max() <= 1e-5
    finally:
        method.remove()


def _group(key, share):
    return "tied" if share else ("first", "last")[int(key.rsplit("#", 1)[1])]


@needs_fixtures
@pytest.mark.parametrize("name", SAVED)
def test_export_of_an_imported_folder_is_pyreft_s_own_files(name, fixture_model, tmp_path):
    exp = _expected(name)
    method = methods.load(FIXTURES / name, fixture_model, positions=exp["position"])
    try:
        pyreft.save_pyreft(method, tmp_path / "out")
    finally:
        method.remove()
    theirs = json.loads((FIXTURES / name / "config.json").read_text())
    ours = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: v for k, v in ours.items() if k != "transformers_version"} == \
           {k: v for k, v in theirs.items() if k != "transformers_version"}
    for file in exp["bin_files"]:
        a = torch.load(FIXTURES / name / file, weights_only=True)
        b = torch.load(tmp_path / "out" / file, weights_only=True)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@needs_fixtures
def test_a_file_that_needs_full_unpickling_is_refused(tmp_path, fixture_model):
    folder = tmp_path / "evil"
    shutil.copytree(FIXTURES / SAVED[0], folder)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    target = next(folder.glob("intkey_*.bin"))
    target.write_bytes(pickle.dumps({"weight": Payload()}))
    with pytest.raises(ConfigError, match="not a plain tensor file") as e:
        methods.load(folder, fixture_model, positions=_expected(SAVED[0])["position"])
    assert "\n" not in str(e.value)
    assert not marker.exists()  # the pickle never ran


@needs_fixtures
def test_positions_are_required_for_a_pyreft_folder(fixture_model):
    with pytest.raises(ConfigError, match="positions") as e:
        methods.load(FIXTURES / SAVED[0], fixture_model)
    assert "\n" not in str(e.value)


def test_not_a_saved_method_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="holds no saved method"):
        methods.load(tmp_path, tiny_llama().model)


# ---- export: our methods in pyreft's format, read back identically ---------------------------------------

def _randomised(name, share, orthogonal_map=None):
    a = tiny_llama(seed=3)
    extra = {"orthogonal_map": orthogonal_map} if orthogonal_map else {}
    m = methods.build(method_cfg(name=name, share_weights=share, layers="0;2", positions="f2+l3", **extra), a.model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return a, m


def _ids(tok):
    from reftbench.data import collate_prompts
    return collate_prompts([tok("abcdefgh")["input_ids"], tok("xyz")["input_ids"]], tok.pad_token_id)


@pytest.mark.parametrize("name,share", [("loreft", True), ("loreft", False)] +
                         [(n, True) for n in sorted(INTERVENTIONS) if n != "loreft"])
def test_save_pyreft_round_trip(tmp_path, name, share):
    a, m = _randomised(name, share)
    batch = _ids(a.tokenizer)
    with torch.no_grad(), m.context(batch):
        expected = a.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pyreft.save_pyreft(m, tmp_path / "pyreft")
    names = sorted(p.name for p in (tmp_path / "pyreft").iterdir())
    assert "config.json" in names and sum(n.startswith("intkey_") for n in names) == len(m.interventions)
    for f in (tmp_path / "pyreft").glob("intkey_*.bin"):
        torch.load(f, weights_only=True)  # plain tensors only
    b = tiny_llama(seed=3)
    m2 = methods.load(tmp_path / "pyreft", b.model)
    with torch.no_grad(), m2.context(batch):
        got = b.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(expected, got)
    assert m2.config == m.config


def test_save_pyreft_keeps_a_weight_decayed_sign_exact():
    """pyreft reads X's diagonal with .int(): an exported −0.99999 would make its R zero."""
    _, m = _randomised("consreft", True)
    iv = next(iter(m.interventions.values()))
    with torch.no_grad():
        iv.rotation.X.diagonal().mul_(0.9999)
    state = pyreft.to_pyreft("consreft", iv)
    assert torch.equal(state["rotate_layer.parametrizations.weight.original"].diagonal(), -torch.ones(4))
    assert torch.equal(state["rotate_layer.parametrizations.weight.0.base"], iv.rotation.base)


def test_qr_method_exports_its_R():
    a, m = _randomised("loreft", True, orthogonal_map="qr")
    iv = next(iter(m.interventions.values()))
    assert torch.equal(pyreft.to_pyreft("loreft", iv)["rotate_layer"], iv.R.detach().T)


@needs_fixtures
def test_positions_that_do_not_fit_the_saved_groups_are_one_line(fixture_model):
    untied = next((n for n in SAVED if not _expected(n)["share_weights"]), None)
    if untied is None:
        pytest.skip("no untied pyreft folder in the fixtures")
    with pytest.raises(ConfigError, match="do not fit") as e:
        methods.load(FIXTURES / untied, fixture_model, positions="l3")  # one side: one group, not first/last
    assert "\n" not in str(e.value)
