"""A run that kills itself with SIGKILL (as `kill -9` would) at a chosen point: right after the
checkpoint of optimiser step K is complete (`after`), or while writing it, before it is renamed
into place (`during`). Used by tests/test_checkpoint.py."""
import os
import signal
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from reftbench import checkpoint
from reftbench.run import run

ROOT = Path(__file__).resolve().parents[2]


def main(out_dir: str, kill_at: int, when: str, *overrides: str):
    real_save, real_replace = checkpoint.Saver.save, os.replace

    def save(self, state):
        if when == "during" and state["step"] == kill_at:
            def replace(src, dst):
                os.kill(os.getpid(), signal.SIGKILL)
            checkpoint.os.replace = replace
        real_save(self, state)
        checkpoint.os.replace = real_replace
        if when == "after" and state["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.Saver.save = save
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    run(cfg, Path(out_dir))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:])
