"""`reftbench`: a Hydra 1.3 app. Bad input ends in one line on stderr and exit code 2."""
import json
import logging
import re
import os
import socket
import sys
import time
import traceback
import uuid
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from . import allocator
from .errors import ReftbenchError
from .preempt import Stopped

_FAILED: list[str] = []  # the sweep's failed jobs, read back from their failed.json files
FAILED_FILE = "failed.json"  # in a job's folder: why it stopped
LAUNCH_FILE = ".reftbench_launch.json"  # in the sweep folder: which launch a failed.json belongs to
# conf/hydra/launcher/submitit_*.yaml give every field of the plugin's schema of the same name (so they
# work whether or not Hydra still checks a file against it); the notice about that check is noise.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/submitit_\w+' is validated against ConfigStore schema")
CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # shipped in the package (conf/ at the repo root links here)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from .run import finished, plan, plan_line, run, summary  # heavy imports after Hydra parsed the command
    hc = HydraConfig.get()
    out_dir = Path(hc.runtime.output_dir)
    sweep = hc.mode == RunMode.MULTIRUN
    reason = None
    try:
        if cfg.dry_run:
            print(plan_line(plan(cfg)))
            return
        done = finished(cfg, out_dir)
        if done:
            (out_dir / FAILED_FILE).unlink(missing_ok=True)
            print(f"skipped, already done: {summary(done)}")
            return
        record = run(cfg, out_dir, overrides=list(hc.overrides.task))
    except Stopped as e:  # SIGTERM/SIGUSR1 with the checkpoint saved: the whole command stops, sweep or not
        print(f"reftbench: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)  # the shell's code for "ended by this signal"
    except (ReftbenchError, OmegaConfBaseException) as e:  # the latter: an interpolation that cannot resolve
        print(f"reftbench: error: {_one_line(str(e))}", file=sys.stderr)
        if not sweep:
            sys.exit(2)
        reason = _record_failure(e, hc, _one_line(str(e)))  # bitfit on a model without biases: a gap, not the end
    except Exception as e:  # out of memory, a bug: in a sweep the next job must still run
        if not sweep:
            raise
        reason = _record_failure(e, hc, f"{type(e).__name__}: {_one_line(str(e))[:300]}")
        print(f"reftbench: error: {reason}", file=sys.stderr)
    if reason is not None:
        # The exception and its frames (this job's model, optimiser, CUDA tensors) are gone now that the
        # except clause has ended; collect what cycles kept, so the next job starts with the memory free.
        from .record import release_freed_memory
        release_freed_memory()
        return
    (out_dir / FAILED_FILE).unlink(missing_ok=True)  # a failure of an earlier launch is history now
    print(summary(record))
    print(f"result: {out_dir / 'result.json'}")


def _record_failure(exc: BaseException, hc, reason: str) -> str:
    """Write the job's failed.json and drop the exception's hold on the job's objects. Hydra would
    keep the exception (and through its traceback the model) alive until the sweep ends."""
    from .record import write_json_atomic
    traceback.clear_frames(exc.__traceback__)
    exc.__traceback__ = None
    write_json_atomic(Path(hc.runtime.output_dir) / FAILED_FILE, {
        "reason": reason, "error": type(exc).__name__, "overrides": list(hc.overrides.task),
        "launch": _launch_id(Path(hc.sweep.dir)), "host": socket.gethostname(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return reason


def _launch_id(sweep_dir: Path) -> str | None:
    try:
        return json.loads((sweep_dir / LAUNCH_FILE).read_text())["id"]
    except (OSError, ValueError, KeyError):
        return None


class SweepSummary(Callback):
    """Registered in config.yaml (hydra.callbacks). Marks each launch in the sweep folder and, when
    the sweep ends, collects the failed.json files its jobs wrote there: the summary holds whichever
    process or machine (joblib, submitit, SLURM) ran them."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from .record import write_json_atomic
        write_json_atomic(Path(config.hydra.sweep.dir) / LAUNCH_FILE, {"id": uuid.uuid4().hex, "started": time.time()})

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        _FAILED[:] = failed_jobs(Path(config.hydra.sweep.dir), swept_keys(list(config.hydra.overrides.task)))


def swept_keys(overrides: list[str]) -> set[str] | None:
    """The keys a command line sweeps over (`seed=1,2`, `experiment=glob(...)`): what tells its jobs apart."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # the summary then names every override of a job
        return None
    return {o.key_or_group for o in parsed if o.is_sweep_override()}


def failed_jobs(sweep_dir: Path, keys: set[str] | None = None) -> list[str]:
    """'overrides (reason)' for each job of the sweep folder's latest launch that wrote a failed.json;
    of the overrides, those of `keys` only when given."""
    launch_id, out = _launch_id(sweep_dir), []
    for path in sorted(sweep_dir.rglob(FAILED_FILE)):
        try:
            failure = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if failure.get("launch") == launch_id:
            shown = [o for o in failure["overrides"] if keys is None or o.split("=")[0].lstrip("+~") in keys]
            out.append(f"{' '.join(shown) or path.parent.name} ({failure['reason']})")
    return out


def quote_semicolons(args: list[str]) -> list[str]:
    """Hydra's override grammar has no bare `;`, but users type `intervention.layers=2;10;18;26`.
    Quote each comma-separated value that holds one, so sweeps like `layers=2;10,all` still work."""
    out = []
    for a in args:
        key, eq, value = a.partition("=")
        if eq and ";" in value and not any(c in value for c in "'\"[]"):
            value = ",".join(f"'{v}'" if ";" in v else v for v in value.split(","))
            a = f"{key}={value}"
        out.append(a)
    return out


def precheck(args: list[str]) -> str | None:
    """Compose a single run's config up front so a bad override costs one line, not a Hydra dump.

    Honours a user's own config folders (`--config-dir DIR`, `hydra.searchpath=[file://DIR]`), so
    their models and tasks are checked like the shipped ones. Returns the error line, or None.
    Multiruns and Hydra's other flags are left to Hydra.
    """
    try:
        overrides = search_path_overrides(args)
    except ValueError as e:
        return str(e)
    if overrides is None:
        return None
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        return _one_line(str(e))
    return None


def search_path_overrides(args: list[str]) -> list[str] | None:
    """The job's overrides with any `--config-dir` folded into `hydra.searchpath` (Hydra's other
    settings do not change the job's config and are dropped); None for a command Hydra must see
    whole (a multirun, --help, --cfg ...)."""
    dirs, out, searchpath, rest = [], [], [], list(args)
    while rest:
        a = rest.pop(0)
        if a in ("--config-dir", "-cd") or a.startswith(("--config-dir=", "-cd=")):
            d = a.split("=", 1)[1] if "=" in a else (rest.pop(0) if rest else "")
            if not os.path.isdir(d):
                raise ValueError(f"--config-dir {d!r} is not a folder: point it at your config folder")
            dirs.append("file://" + os.path.abspath(d))
        elif a.startswith("-"):
            return None
        elif a.startswith("hydra.searchpath="):
            from hydra.core.override_parser.overrides_parser import OverridesParser
            value = OverridesParser.create().parse_override(a).value()
            searchpath = list(value) if isinstance(value, list) else [value]
        elif not a.startswith(("hydra.", "hydra/")):
            out.append(a)
    paths = searchpath + dirs
    return out + (["hydra.searchpath=[" + ",".join(repr(str(p)) for p in paths) + "]"] if paths else [])


def _one_line(text: str) -> str:
    text = text.split("Set the environment variable")[0]
    m = re.search(r"Interpolation key 'per_task\.([^.']+)", text)
    if m:
        return (f"this experiment has per-task settings (per_task) and none for task={m.group(1)}: "
                "choose a task it lists")
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        return f"{m.group(1)} is not an option (check the spelling; to add a new key use +{m.group(1)}=...)"
    m = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if m:
        group = m.group(1)
        opts = re.search(r"Available options in '[^']+':\s*(.*?)(?:Config search path|$)", text, re.S)
        avail = ", ".join(opts.group(1).split()) if opts else "see conf/" + group
        return f"{group}={m.group(2)} is unknown: choose one of {avail}"
    return " ".join(text.split())


def local_dry_run(args: list[str]) -> list[str]:
    """A dry run plans, it never submits: drop the launcher choice so the plan prints here."""
    if not any(re.fullmatch(r"\+*dry_run=(true|True|1)", a) for a in args):
        return args
    kept = [a for a in args if not re.match(r"\+*hydra(/launcher=|\.launcher\.)", a)]
    if len(kept) < len(args):
        print("reftbench: dry run: planning here, not through the launcher", file=sys.stderr)
    return kept


def main() -> None:
    sys.argv[1:] = local_dry_run(quote_semicolons(sys.argv[1:]))
    _FAILED.clear()
    error = precheck([a for a in sys.argv[1:] if not a.startswith("hydra.run.dir=")])
    if error:
        print(f"reftbench: error: {error}", file=sys.stderr)
        sys.exit(2)
    if int(os.environ.get("RANK", "0")) > 0:  # a distributed run's other processes: no folder, log or config of
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]  # their own; run() takes the first
        if not any(a.startswith("hydra.run.dir=") for a in sys.argv):  # process's folder (`${now:}` may differ)
            sys.argv.append("hydra.run.dir=.")
    # HF_HUB_OFFLINE is the user's: online where there is a network (hub models, data URLs); without
    # one, HF_HUB_OFFLINE=1 skips the hub's retries and an unloadable model is still one line.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # not a line per checkpoint file
    _app()
    if _FAILED:
        print(f"reftbench: error: {len(_FAILED)} job(s) of the sweep could not run: " + "; ".join(_FAILED)
              + f" (each job's {FAILED_FILE} says why)", file=sys.stderr)
        sys.exit(2)


def entry() -> None:
    """The `reftbench` command: glibc's malloc set up for training (a re-exec, see allocator.py), then main."""
    allocator.reexec()
    main()


if __name__ == "__main__":
    entry()
