"""Ways to adapt a frozen model, registered by name: `intervention=<name>` picks one."""
from .base import REGISTRY, Method, MethodConfig, build, check, load, register  # noqa: F401
from . import reft  # noqa: F401  (registers loreft, noreft, direft)
