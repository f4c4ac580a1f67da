"""`reftbench`: a Hydra 1.3 app. Bad input ends in one line on stderr and exit code 2."""
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .errors import ReftbenchError

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from .run import run, summary  # heavy imports after Hydra has parsed the command line
    hc = HydraConfig.get()
    try:
        record = run(cfg, Path(hc.runtime.output_dir), overrides=list(hc.overrides.task))
    except ReftbenchError as e:
        print(f"reftbench: error: {e}", file=sys.stderr)
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


def main() -> None:
    sys.argv[1:] = quote_semicolons(sys.argv[1:])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    _app()


if __name__ == "__main__":
    main()
