"""`reftbench`: a Hydra 1.3 app. Bad input ends in one line on stderr and exit code 2."""
import logging
import re
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from .errors import ReftbenchError

_FAILED: list[str] = []  # multirun jobs that stopped on bad input
CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # shipped in the package (conf/ at the repo root links here)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from .run import finished, plan, plan_line, run, summary  # heavy imports after Hydra parsed the command
    hc = HydraConfig.get()
    try:
        if cfg.dry_run:
            print(plan_line(plan(cfg)))
            return
        done = finished(cfg, Path(hc.runtime.output_dir))
        if done:
            print(f"skipped, already done: {summary(done)}")
            return
        record = run(cfg, Path(hc.runtime.output_dir), overrides=list(hc.overrides.task))
    except (ReftbenchError, OmegaConfBaseException) as e:  # the latter: an interpolation that cannot resolve
        print(f"reftbench: error: {_one_line(str(e))}", file=sys.stderr)
        if hc.mode == RunMode.MULTIRUN:  # one job that can't run (bitfit on a model without biases)
            _FAILED.append(" ".join(hc.overrides.task))  # leaves a gap in the sweep, not its end
            return
        sys.exit(2)
    print(summary(record))
    print(f"result: {Path(hc.runtime.output_dir) / 'result.json'}")


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


def main() -> None:
    sys.argv[1:] = quote_semicolons(sys.argv[1:])
    error = precheck([a for a in sys.argv[1:] if not a.startswith("hydra.run.dir=")])
    if error:
        print(f"reftbench: error: {error}", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    _app()
    if _FAILED:
        print(f"reftbench: error: {len(_FAILED)} job(s) of the sweep could not run: " + "; ".join(_FAILED),
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
