"""Declarative tasks: where the data comes from, how a prompt looks, how an answer is checked."""
from .base import Task, build  # noqa: F401
