"""Parity with pyreft on golden data it computed (../shared/fixtures/pyreft, see its README).

Every case is read from the fixtures' JSON, so another fixture set in the same format is checked by
pointing REFTBENCH_PYREFT_FIXTURES at it: positions for every prompt length and fN+lM setting, the
logits of every intervention class on stored weights, and pyreft's training trajectory.
"""
import json
import os
from pathlib import Path

import pytest
import torch

from reftbench import methods
from reftbench.integrations import pyreft
from reftbench.positions import Positions
from reftbench.train import answer_loss

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("REFTBENCH_PYREFT_FIXTURES") or ROOT.parent / "shared" / "fixtures" / "pyreft")
pytestmark = pytest.mark.skipif(not (FIXTURES / "forward.json").is_file(), reason=f"no pyreft fixtures at {FIXTURES}")


def _json(name):
    path = FIXTURES / name
    return json.loads(path.read_text()) if path.is_file() else {}


FORWARD = _json("forward.json")
TRAJECTORY = _json("trajectory.json")


@pytest.fixture(scope="module")
def tensors():
    from safetensors.torch import load_file
    return load_file(str(FIXTURES / "forward.safetensors"))


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(FIXTURES / FORWARD["model_dir"]).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def _batch(tensors):
    n = len(FORWARD["prompt_lengths"])
    return {"input_ids": tensors["input_ids"], "attention_mask": tensors["attention_mask"],
            "labels": tensors["labels"], "prompt_lengths": FORWARD["prompt_lengths"], "prompt_offsets": [0] * n}


def _build(case, model):
    cfg = dict(name=pyreft.our_name(case["pyreft_class"]), rank=FORWARD["low_rank_dimension"],
               layers=sorted(set(case["layers_per_intervention"])), positions=case["position"],
               share_weights=case["share_weights"], dropout=FORWARD["intervention_kwargs"]["dropout"])
    return methods.build(cfg, model)


def _site_module(method, intervention):
    return method.interventions[f"layer{intervention['layer']}_{intervention['group']}"]


# ---- positions -----------------------------------------------------------------------------------------

def _position_settings():
    settings = {}
    for case in _json("positions.json").get("cases", []):
        settings.setdefault((case["position"], case["share_weights"]), []).append(case)
    return settings


@pytest.mark.parametrize("setting", sorted(_position_settings()), ids=lambda s: f"{s[0]}-{'tied' if s[1] else 'untied'}")
def test_positions_match_pyreft_for_every_prompt_length(setting):
    """One padded batch holding every prompt length (left padding, so offsets differ per row)."""
    position, share = setting
    cases = _position_settings()[setting]
    p = Positions.parse(position)
    longest = max(c["n"] for c in cases)
    offsets = [longest - c["n"] for c in cases]
    index = p.index([c["n"] for c in cases], offsets, share)
    for case in cases:
        assert (p.first, p.last) == (case["first_n"], case["last_n"])
        assert p.groups(share) == case["groups"]
    for g, group in enumerate(p.groups(share)):
        rows, cols = index[group]
        for b, case in enumerate(cases):
            ours = (cols[rows == b] - offsets[b]).tolist()
            assert ours == case["real"][g], (case["n"], group)  # sorted, each position once


# ---- forward: every intervention class on stored weights ----------------------------------------------

@pytest.mark.parametrize("name", sorted(FORWARD.get("cases", {})))
def test_forward_matches_pyreft_logits(name, tensors, model):
    case = FORWARD["cases"][name]
    method = _build(case, model)
    try:
        state = {}
        for iv in case["interventions"]:
            saved = {k: tensors[v["tensor"]] for k, v in iv["state_dict"].items()}
            for k, v in pyreft.to_ours(method.config.name, saved).items():
                state[f"interventions.layer{iv['layer']}_{iv['group']}.{k}"] = v
        method.load_state_dict(state)
        for iv in case["interventions"]:
            if "R" in iv["formula_tensors"]:  # the effective rotation, as pyreft computed it
                R = tensors[iv["formula_tensors"]["R"]["tensor"]]
                assert (_site_module(method, iv).R - R).abs().max() <= 1e-7
        method.eval()
        batch = _batch(tensors)
        with torch.no_grad(), method.context(batch):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = answer_loss(model, batch)
        mask = batch["attention_mask"].bool()
        expected = tensors[case["logits"]]
        assert (logits - expected)[mask].abs().max() <= 1e-5
        assert (tensors[FORWARD["base"]["logits"]] - expected)[mask].abs().max() > 1e-2  # the edit is visible
        assert loss.item() == pytest.approx(case["loss"], abs=1e-5)
    finally:
        method.remove()


# ---- training trajectory -------------------------------------------------------------------------------

def _trajectory_case():
    """The forward case the trajectory starts from, named by its batch's locations tensor."""
    source = TRAJECTORY["batch"]["tensors"]["intervention_locations"]  # "forward.safetensors:<case>.locations_sink"
    return FORWARD["cases"][source.split(":", 1)[1].split(".", 1)[0]]


@pytest.fixture(scope="module")
def trajectory_tensors():
    from safetensors.torch import load_file
    return load_file(str(FIXTURES / "trajectory.safetensors"))


@pytest.mark.parametrize("traj", sorted(TRAJECTORY.get("trajectories", {})))
def test_training_trajectory_matches_pyreft(traj, tensors, trajectory_tensors, model):
    spec, t = TRAJECTORY["trajectories"][traj], trajectory_tensors
    case = _trajectory_case()
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAJECTORY["versions"].get("num_threads", threads))
    method = _build(case, model)
    try:
        sites = {iv["site"]: _site_module(method, iv) for iv in case["interventions"]}
        with torch.no_grad():
            for site, iv in sites.items():
                iv.W.weight.copy_(t[f"init.{site}.W"])
                iv.W.bias.copy_(t[f"init.{site}.b"])
                iv.rotation.set_state(t[f"init.{site}.base"], t[f"init.{site}.original"])
                assert torch.equal(iv.R, t[f"init.{site}.R"])
        opt_cls = getattr(torch.optim, spec["optimizer"].rsplit(".", 1)[-1])
        opt = opt_cls(method.trainable_parameters(), **spec["optimizer_kwargs"])
        batch = _batch(tensors)
        losses = []
        for step in range(1, spec["steps"] + 1):
            with method.context(batch):
                loss = answer_loss(model, batch)
            losses.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in spec["recorded_steps"]:
                for site, iv in sites.items():
                    prefix = f"{traj}.step{step}.{site}"
                    for ours, key in ((iv.R, "R"), (iv.W.weight, "W"), (iv.W.bias, "b"), (iv.rotation.X, "original")):
                        assert (ours.detach() - t[f"{prefix}.{key}"]).abs().max() <= 1e-6, (prefix, key)
        with torch.no_grad(), method.context(batch):
            losses.append(answer_loss(model, batch).item())
        assert losses == pytest.approx(t[spec["loss"]["tensor"]].tolist(), abs=1e-5)
    finally:
        method.remove()
        torch.set_num_threads(threads)
