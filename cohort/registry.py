"""One small generic registry: register by name, look up with a "did you mean" error.

Models, methods and pairings each keep one instance; config validation and the
public ``list_*`` functions read names from it, so a new entry is validated and
tested by being registered.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that is not in a registry; the message lists what is valid."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want plain text
        return str(self.args[0])


def suggest(name: str, valid: list[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest valid name, or ``""``."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry(Generic[T]):
    """Maps names to objects of one kind (model specs, method classes, pairings)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers its target under ``name``."""

        def add(item: T) -> T:
            self.add(name, item)
            return item

        return add

    def add(self, name: str, item: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._items[name] = item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def validate(self, name: str) -> str:
        """``name`` if registered, else a ValueError naming what is valid (for pydantic validators)."""
        if name not in self._items:
            raise ValueError(self.unknown_message(name))
        return name

    def unknown_message(self, name: str) -> str:
        valid = self.names()
        return f"unknown {self.kind} '{name}'{suggest(str(name), valid)}; valid: {', '.join(valid)}"

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
