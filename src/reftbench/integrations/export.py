"""`reftbench-export RUN_DIR --out DIR [--merged]`: a trained run in a standard format.

--merged   a plain transformers model folder (weights + tokenizer) whose outputs equal the run's,
           for the methods whose edit folds exactly into the weights: LoRA and DoRA (peft's
           merge_and_unload), full finetuning and BitFit (the trained weights are the model), and
           `none`. ReFT methods act on chosen positions of the residual stream, not on weights, so
           they cannot be merged; RED's added bias has no place in a Llama checkpoint.
(default)  the method in its own standard format: peft's adapter folder for LoRA/DoRA, pyreft's for
           the ReFT methods, a model folder for the methods that train base weights.
Bad input (no such folder, a run without saved weights, a method that cannot be exported that way)
is one line on stderr and exit code 2, with nothing written.
"""
import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import ReftbenchError, ConfigError

REFT = ("loreft", "noreft", "direft", "orthdireft", "consreft", "lobireft")  # the ReFT family: all in pyreft's format
NOT_MERGEABLE = {
    **{m: ("it acts on chosen positions of the residual stream (the prompt's first and last tokens), not on "
           "weights, so it cannot be folded into them; export it without --merged (pyreft's format)") for m in REFT},
    "red": ("its per-dimension bias on each FFN output has no place in a bias-free Llama checkpoint; "
            "load the run with reftbench.methods.load instead"),
}
PEFT = ("lora", "dora")
WEIGHTS = ("full", "bitfit", "none")  # the trained weights are the model's own


def export(run_dir, out, merged: bool = False) -> str:
    """Write the export into `out` (created whole in a temporary folder, then moved into place);
    returns a line saying what was written."""
    from .runs import read_record
    run_dir, out = Path(run_dir), Path(out)
    record = read_record(run_dir)
    name = record.get("method") or record["config"]["intervention"]["name"]
    if merged and name in NOT_MERGEABLE:
        raise ConfigError(f"a {name} run cannot be merged into the model's weights: {NOT_MERGEABLE[name]}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty folder: choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        what = _write(run_dir, record, name, tmp, merged)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"{name} run {run_dir} -> {out}: {what}"


def _write(run_dir: Path, record: dict, name: str, out: Path, merged: bool) -> str:
    from .runs import load_run
    if name in PEFT:
        if merged:
            _merge_peft(run_dir, record, out)
            return "a transformers model folder, the adapter merged by peft (merge_and_unload)"
        from ..methods.peft_methods import save_peft
        save_peft(load_run(run_dir).method, out)
        return "peft's adapter format (PeftModel.from_pretrained(base, folder))"
    if name in WEIGHTS:
        run = load_run(run_dir)
        _save_model(run.model, run.tokenizer, out)
        return "a transformers model folder (the trained weights)"
    if name in REFT and not merged:
        # ------------------------------------------------------------------------------------------
        # pyreft's format: written by reftbench.integrations.pyreft (wired in by the lead).
        try:
            from .pyreft import save_pyreft
        except ImportError:
            raise ConfigError("exporting ReFT runs in pyreft's format needs reftbench.integrations.pyreft, "
                              "which this install lacks") from None
        save_pyreft(load_run(run_dir).method, out)
        return "pyreft's intervention format"
        # ------------------------------------------------------------------------------------------
    raise ConfigError(f"a {name} run has no standard format outside reftbench: its intervention/ folder "
                      "(method.json, weights.safetensors) is it; reftbench.methods.load(folder, model) reads it")


def _save_model(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _merge_peft(run_dir: Path, record: dict, out: Path) -> None:
    """Through peft itself: the adapter in peft's format on a fresh copy of the base model, then
    merge_and_unload. The run's adapter is loaded by our loader first (runs saved before the peft
    format existed have only ours), written in peft's format, and dropped before the fresh base loads."""
    from peft import PeftModel
    from ..methods.peft_methods import save_peft
    from .runs import load_base, load_head, load_run
    with tempfile.TemporaryDirectory() as adapter:
        run = load_run(run_dir)
        tokenizer = run.tokenizer
        save_peft(run.method, adapter)
        del run
        base, _, _ = load_base(record)
        load_head(base, run_dir)
        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    _save_model(merged.eval(), tokenizer, out)


def _quiet() -> None:
    """Nothing is fetched, and transformers' progress bars and deprecation notes stay off stderr."""
    import os
    import warnings
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="reftbench-export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder (holding result.json and intervention/)")
    parser.add_argument("--out", type=Path, required=True, help="a new folder to write the export into")
    parser.add_argument("--merged", action="store_true",
                        help="fold the method into the weights: a plain transformers model (LoRA, DoRA, full, BitFit)")
    args = parser.parse_args(argv)
    _quiet()
    try:
        print(export(args.run_dir, args.out, args.merged))
    except ReftbenchError as e:
        print(f"reftbench-export: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
