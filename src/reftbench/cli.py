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


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at run time
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    _app()


if __name__ == "__main__":
    main()
