"""Declarative tasks: where the data comes from, how a prompt looks, how an answer is checked."""
from .base import Task, build, dev_facts  # noqa: F401
from .metrics import (accuracy_by_eval_task, alpaca_eval_records, glue_metrics,  # noqa: F401
                      split_validation, write_alpaca_eval)
