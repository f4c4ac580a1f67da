"""`intervention=none`: nothing added, nothing of the base trained. On a generation task this is
the frozen model; on a classification task only the head trains: the linear-probe baseline."""
from .base import Method, MethodConfig, register


@register("none", MethodConfig)
class NoMethod(Method):
    def trainable_parameters(self):
        return []

    def added_parameters(self) -> int:
        return 0
