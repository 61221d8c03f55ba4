"""A name -> factory table for a swappable component, with errors that list the valid names."""

from __future__ import annotations

from typing import Callable


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable:
        def wrap(factory):
            if name in self:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self[name] = factory
            return factory

        return wrap

    def get_valid(self, name: str) -> Callable:
        if name not in self:
            raise KeyError(f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self))}")
        return self[name]
