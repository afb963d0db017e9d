"""Who teaches whom: ``teachers(j, n, epoch)`` for peer j of an n-peer cohort.

Methods receive a list of teacher messages, so any method works with any pairing.
``possible_teachers`` is every peer that can ever teach j, so a peer can build the
extras it will need (one discriminator set per teacher) before training starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import Registry


@dataclass(frozen=True)
class Pairing:
    """Base: a seeded teacher assignment. Subclasses override ``teachers``."""

    seed: int = 0

    def teachers(self, j: int, n: int, epoch: int) -> tuple[int, ...]:
        raise NotImplementedError

    def possible_teachers(self, j: int, n: int) -> tuple[int, ...]:
        return tuple(t for t in range(n) if t != j)


PAIRINGS: Registry[type[Pairing]] = Registry("pairing")


@PAIRINGS.register("cyclic")
class Cyclic(Pairing):
    """Peer j learns from peer (j+1) mod n (AFD's cyclic scheme); n=2 is plain mutual
    learning. Each peer has one teacher, so its extras and traffic do not grow with n."""

    def teachers(self, j: int, n: int, epoch: int) -> tuple[int, ...]:
        return ((j + 1) % n,)

    def possible_teachers(self, j: int, n: int) -> tuple[int, ...]:
        return ((j + 1) % n,)


@PAIRINGS.register("all_pairs")
class AllPairs(Pairing):
    """DML's n-peer form: every peer learns from all others (losses averaged)."""

    def teachers(self, j: int, n: int, epoch: int) -> tuple[int, ...]:
        return self.possible_teachers(j, n)


@PAIRINGS.register("shuffled_ring")
class ShuffledRing(Pairing):
    """A new random ring each epoch, seeded by (seed, epoch); peer j learns from its
    successor on that ring. Extras exist for every possible teacher; only the
    current one's are used and trained in a given epoch."""

    def ring(self, n: int, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=generator).tolist()

    def teachers(self, j: int, n: int, epoch: int) -> tuple[int, ...]:
        order = self.ring(n, epoch)
        position = order.index(j)
        return (order[(position + 1) % n],)


def make_pairing(name: str, seed: int = 0) -> Pairing:
    """The registered pairing ``name`` seeded with the run's seed."""
    return PAIRINGS.get(name)(seed=seed)


def list_pairings() -> list[str]:
    return PAIRINGS.names()
