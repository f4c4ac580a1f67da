"""Ways to adapt a frozen model, registered by name: `intervention=<name>` picks one."""
from .base import REGISTRY, Method, MethodConfig, active, build, check, load, register  # noqa: F401
from . import none, reft  # noqa: F401  (registers none, loreft, noreft, direft)
from . import peft_methods, red, bitfit, full  # noqa: F401
from . import finegates  # noqa: F401  (registers finegates, finegates_lora)
