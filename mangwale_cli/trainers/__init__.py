"""Trainers: one class per job kind, found by ``kind`` in a registry."""

from __future__ import annotations

from ..errors import InvalidInput
from .base import Trainer, TrainingContext
from .nlu import FineTuneTrainer, NluTrainer
from .simulate import SimulateTrainer


class Registry:
    def __init__(self, trainers: list[Trainer] | None = None) -> None:
        self._by_kind: dict[str, Trainer] = {}
        for t in trainers if trainers is not None else builtin():
            self.add(t)

    def add(self, trainer: Trainer) -> None:
        self._by_kind[trainer.kind] = trainer

    def get(self, kind: str) -> Trainer:
        try:
            return self._by_kind[kind]
        except KeyError:
            kinds = ", ".join(sorted(self._by_kind))
            raise InvalidInput(f"unknown job kind {kind!r} (known: {kinds})", field="kind", code="unknown_kind") from None

    def names(self) -> frozenset[str]:
        return frozenset(self._by_kind)

    def has(self, kind: str) -> bool:
        return kind in self._by_kind

    def kinds(self) -> list[Trainer]:
        return [self._by_kind[k] for k in sorted(self._by_kind)]


def builtin() -> list[Trainer]:
    return [SimulateTrainer(), NluTrainer(), FineTuneTrainer()]


__all__ = ["Registry", "Trainer", "TrainingContext", "builtin"]
