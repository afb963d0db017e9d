"""Online distillation methods behind one interface (see base.Method)."""

from __future__ import annotations

from ..registry import Registry
from .afd import AFD
from .amln import AMLN
from .base import Message, Method
from .dml import DML
from .lmcl import LMCL
from .mcl import MCL
from .vanilla import Vanilla

METHODS: Registry[type[Method]] = Registry("method")
for method in (Vanilla, DML, AMLN, AFD, MCL, LMCL):
    METHODS.add(method.name(), method)  # the name is the ``name`` literal of its config class


def build_method(config) -> Method:
    """The method a validated ``Config.method`` section names, configured by it."""
    return METHODS.get(config.name)(config)


def list_methods() -> list[str]:
    return METHODS.names()


__all__ = ["METHODS", "Message", "Method", "build_method", "list_methods"]
