"""pyreft interop: read an intervention saved by pyreft's `ReftModel.save`, write ours in its format.

pyreft (pyvene) saves a folder with `config.json` (an IntervenableConfig: one representation per
intervention, `intervention_types`, `sorted_keys`) and one `intkey_{key}.bin` per intervention
(`torch.save` of the intervention's state_dict). Keys look like
`layer_{L}_comp_block_output_unit_pos_nunit_1#{i}`; with untied weights (pyreft's train.py doubles
the layer list) `#0` is the "first" positions' intervention and `#1` the "last" one's.

pyreft does not record the positions (`-p f7+l7` of its train.py), the dropout or the dtype: the
positions must be given. The .bin files are read with `torch.load(weights_only=True)` only, and the
values keep their saved dtype (pyreft's own loader rounds W and b to bfloat16).
"""
import dataclasses
import json
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import torch
import transformers

from ..atomic import atomic_path
from ..errors import ConfigError
from ..interventions import HouseholderRows, householder_map, householder_state
from ..record import write_json_atomic

# pyreft class -> our intervention name (reftbench.interventions)
CLASSES = {
    "LoreftIntervention": "loreft",
    "NoreftIntervention": "noreft",
    "NodireftIntervention": "direft",
    "DireftIntervention": "orthdireft",
    "ConsreftIntervention": "consreft",
    "LobireftIntervention": "lobireft",
}
PYREFT_CLASS = {ours: theirs for theirs, ours in CLASSES.items()}

# pyreft state_dict key -> ours, per intervention (rotations are handled apart)
_PARAMS = {
    "loreft": {"weight": "W.weight", "bias": "W.bias", "learned_source.weight": "W.weight", "learned_source.bias": "W.bias"},
    "orthdireft": {"learned_source.weight": "W.weight", "learned_source.bias": "W.bias"},
    "noreft": {"learned_source.weight": "W.weight", "learned_source.bias": "W.bias", "proj_layer.weight": "W2.weight"},
    "direft": {"learned_source.weight": "W1.weight", "learned_source.bias": "W1.bias", "proj_layer.weight": "W2.weight"},
    "consreft": {"learned_source": "b"},
    "lobireft": {"learned_source": "b"},
}
_ROT = "rotate_layer"  # LoReFT's compact form: the effective weight Rᵀ [d, r]
_ROT_X = "rotate_layer.parametrizations.weight.original"
_ROT_B = "rotate_layer.parametrizations.weight.0.base"
_BUFFERS = ("embed_dim", "interchange_dim")
_KEY_RE = re.compile(r"^layer_(\d+)_comp_(.+)_unit_pos_nunit_1#(\d+)$")
OURS_FILE = "reftbench_method.json"  # our options beside an export; pyreft ignores the file


def class_name(type_string: str) -> str:
    """"<class 'pyreft.interventions.LoreftIntervention'>" or "pyreft.LoreftIntervention" -> LoreftIntervention."""
    return re.sub(r"^<class '|'>$", "", str(type_string)).rsplit(".", 1)[-1]


def our_name(type_string: str) -> str:
    name = class_name(type_string)
    if name not in CLASSES:
        raise ConfigError(f"pyreft intervention {name!r} has no reftbench counterpart: supported are {', '.join(CLASSES)}")
    return CLASSES[name]


def is_saved(path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("intkey_*.bin"))


def read_bin(path) -> dict:
    """A pyreft .bin, read as tensors only: anything that needs full unpickling is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} is not a plain tensor file, and reftbench reads pyreft files with weights_only=True only: {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} does not hold a state dict of tensors")
    return state


def to_ours(name: str, state: dict, where: str = "") -> dict:
    """pyreft's state_dict of one intervention -> our module's keys. The rotation becomes either
    `rotation.R` (from LoReFT's compact effective weight) or `rotation.base` + `rotation.X` (torch's
    parametrisation state, loaded as is: our Householder map is torch's)."""
    params = _PARAMS[name]
    out, left = {}, dict(state)
    for k in _BUFFERS:
        left.pop(k, None)
    for theirs, ours in params.items():
        if theirs in left:
            out[ours] = left.pop(theirs)
    if _ROT in left:
        out["rotation.R"] = left.pop(_ROT).T.contiguous()
    elif _ROT_X in left and _ROT_B in left:
        out["rotation.X"], out["rotation.base"] = left.pop(_ROT_X), left.pop(_ROT_B)
    if left:
        raise ConfigError(f"pyreft {PYREFT_CLASS[name]}{where} has unexpected tensors {sorted(left)} (NoReFT with add_bias is not supported)")
    return out


def to_pyreft(name: str, iv) -> "OrderedDict[str, torch.Tensor]":
    """Our intervention -> the state_dict pyreft's class of the same formula saves."""
    ours = {k: v.detach() for k, v in iv.state_dict().items()}
    out = OrderedDict()
    if name == "loreft":  # LoreftIntervention overrides state_dict: {weight, bias, rotate_layer = Rᵀ}
        out["weight"], out["bias"] = ours["W.weight"], ours["W.bias"]
        out[_ROT] = iv.R.detach().T.contiguous()
        return out
    for theirs, mine in _PARAMS[name].items():
        out[theirs] = ours[mine]
    if hasattr(iv, "rotation"):
        if isinstance(iv.rotation, HouseholderRows):
            base, x = iv.rotation.base.detach(), ours["rotation.X"].clone()  # B: a non-persistent buffer
            # pyreft reads the signs with .int(): give it exact ±1 (weight decay may have shrunk them)
            x.diagonal().copy_(torch.where(x.diagonal() < 0, -1.0, 1.0))
        else:  # the QR map: a Householder state around our R
            base, x = householder_state(iv.R.detach())
        out[_ROT_X], out[_ROT_B] = x, base
    out["embed_dim"], out["interchange_dim"] = torch.tensor(iv.embed_dim), torch.tensor(iv.embed_dim)
    return out


def _layout(config: dict, path) -> tuple[str, list[int], int, bool, list[tuple[str, int, str]]]:
    """(our intervention name, layers, rank, share_weights, [(key, layer, group)]) from pyreft's config.json."""
    try:
        types, reps, keys = config["intervention_types"], config["representations"], config["sorted_keys"]
    except (KeyError, TypeError):
        raise ConfigError(f"{path}/config.json is not a pyvene IntervenableConfig (needs intervention_types, representations, sorted_keys)") from None
    names = {our_name(t) for t in types}
    if len(names) != 1:
        raise ConfigError(f"{path} mixes intervention classes {sorted(names)}: reftbench uses one per method")
    ranks = {int(r[4]) for r in reps}
    if len(ranks) != 1:
        raise ConfigError(f"{path} mixes low-rank dimensions {sorted(ranks)}: reftbench uses one rank per method")
    sites = []
    for key in keys:
        m = _KEY_RE.match(key)
        if not m or m.group(2) != "block_output":
            raise ConfigError(f"{path}: intervention {key!r} is not on a layer's block_output with positional units, the only site reftbench intervenes on")
        sites.append((key, int(m.group(1)), int(m.group(3))))
    untied = any(i > 0 for _, _, i in sites)
    if any(i > 1 for _, _, i in sites):
        raise ConfigError(f"{path} has more than two interventions on one layer: reftbench has at most a first and a last one")
    layers = sorted({layer for _, layer, _ in sites})
    groups = ("first", "last") if untied else ("tied",)
    placed = [(key, layer, groups[i]) for key, layer, i in sites]
    if len(placed) != len(layers) * len(groups):
        raise ConfigError(f"{path}: untied interventions need both #0 (first) and #1 (last) on every layer")
    return names.pop(), layers, ranks.pop(), not untied, placed


def load(path, model, positions: str | None = None, **options):
    """Build our method from a pyreft folder; `positions` (e.g. "f7+l7") is required unless the
    folder was exported by reftbench (which writes its options beside pyreft's files)."""
    from .. import methods
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}/config.json cannot be read: {e}") from None
    name, layers, rank, share, placed = _layout(config, path)
    saved = json.loads((path / OURS_FILE).read_text()) if (path / OURS_FILE).is_file() else {}
    cfg = {"name": name, "rank": rank, "layers": layers, "share_weights": share, **saved, **options}
    if positions is not None:
        cfg["positions"] = positions
    if "positions" not in cfg:
        raise ConfigError("pyreft's config.json does not record the positions: pass positions=, e.g. 'f7+l7' (pyreft train.py's -p)")
    method = methods.build(cfg, model)
    groups = sorted({g for _, _, g in placed})
    found = (method.config.name, method.config.rank, method.layer_ids, sorted(method.groups))
    if found != (name, rank, layers, groups):
        method.remove()
        raise ConfigError(f"the options (intervention, rank, layers, groups) = {found} do not fit {path}, "
                          f"which holds {(name, rank, layers, groups)}: check positions= and share_weights")
    state = {}
    for key, layer, group in placed:
        bin_path = path / f"intkey_{key}.bin"
        if not bin_path.is_file():
            raise ConfigError(f"{bin_path} is missing")
        for k, v in to_ours(name, read_bin(bin_path), f" in {bin_path.name}").items():
            state[f"interventions.layer{layer}_{group}.{k}"] = v
    _load_state(method, state, path)
    return method


def _load_state(method, state: dict, path) -> None:
    for k in [k for k in state if k.endswith(".rotation.X")]:
        rot = method.get_submodule(k[: -len(".X")])
        if not hasattr(rot, "X"):  # the QR map (orthogonal_map=qr): load the effective R
            prefix = k[: -len("X")]
            state[prefix + "R"] = householder_map(state.pop(prefix + "base"), state.pop(prefix + "X")).T
    try:
        method.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"{path} does not fit the model: {str(e).splitlines()[0]}") from None


def save_pyreft(method, out_dir) -> Path:
    """Write our ReFT method in pyreft's format (config.json + intkey_*.bin), plus our options in
    reftbench_method.json so `methods.load` reads it back without being told the positions."""
    name = method.config.name
    if name not in PYREFT_CLASS:
        raise ConfigError(f"intervention={name} has no pyreft counterpart: pyreft has {', '.join(PYREFT_CLASS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    group_index = {"tied": 0, "first": 0, "last": 1}
    entries = sorted(((group_index[g], layer, g) for layer in method.layer_ids for g in method.groups))
    keys, reps = [], []
    for i, layer, group in entries:
        key = f"layer_{layer}_comp_block_output_unit_pos_nunit_1#{i}"
        with atomic_path(out / f"intkey_{key}.bin") as tmp:
            torch.save(to_pyreft(name, method.interventions[f"layer{layer}_{group}"]), tmp)
        keys.append(key)
        reps.append([layer, "block_output", "pos", 1, int(method.config.rank)] + [None] * 9)
    d = method.interventions[next(iter(method.interventions))].embed_dim
    write_json_atomic(out / "config.json", {
        "intervention_constant_sources": [True] * len(keys),
        "intervention_dimensions": [d] * len(keys),
        "intervention_types": [f"<class 'pyreft.interventions.{PYREFT_CLASS[name]}'>"] * len(keys),
        "mode": "parallel",
        "representations": reps,
        "sorted_keys": keys,
        "transformers_version": transformers.__version__,
    })
    write_json_atomic(out / OURS_FILE, dataclasses.asdict(method.config))
    return out
