"""Online distillation methods behind one interface (see base.Method)."""

from __future__ import annotations

from ..registry import Registry
from .afd import AFD
from .amln import AMLN
from .base import Message, Method
from .dml import DML
from .vanilla import Vanilla

METHODS: Registry[type[Method]] = Registry("method")
METHODS.add("vanilla", Vanilla)
METHODS.add("dml", DML)
METHODS.add("amln", AMLN)
METHODS.add("afd", AFD)


def build_method(config) -> Method:
    """The method a validated ``Config.method`` section names, configured by it."""
    return METHODS.get(config.name)(config)


def list_methods() -> list[str]:
    return METHODS.names()


__all__ = ["METHODS", "Message", "Method", "build_method", "list_methods"]
