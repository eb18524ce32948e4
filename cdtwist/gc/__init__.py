# -*- test-case-name: tests.test_gc -*-
"""Garbage collection primitives (containerd's ``gc`` package).

A resource is a :class:`Node` (type, namespace, key); marking walks the
reference graph from a set of roots and returns everything reachable, and
sweeping removes the rest.  What the graph looks like is the metadata
store's business (:mod:`cdtwist.metadata.gc`); the scheduling policy lives
in :mod:`cdtwist.gc.scheduler`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

#: Bits above this are free for the caller's reference function (flat
#: variants of a type); marking strips them (``gc.ResourceMax``).
RESOURCE_MAX = 0x1F


class Node(NamedTuple):
    """One resource: hashable, so marks are sets of nodes."""

    type: int
    namespace: str
    key: str


@dataclass(frozen=True)
class Stats:
    """How long a collection took (``metadata.GCStats``), in seconds.

    ``elapsed`` is the metadata phase only (mark and sweep of records), the
    pause the scheduler budgets for; backend cleanup runs after it.
    """

    meta: float = 0.0
    content: float = 0.0
    snapshots: tuple[tuple[str, float], ...] = ()

    @property
    def elapsed(self) -> float:
        return self.meta


def tricolor(roots: Iterable[Node], refs: Callable[[Node], Iterable[Node]]) -> set[Node]:
    """Everything reachable from ``roots`` (``gc.Tricolor``), depth first.

    A node is looked up by its full type (flat bits included), but the
    reachable set holds it with the bits above :data:`RESOURCE_MAX` stripped.
    """
    grays = list(roots)
    seen: set[Node] = set()
    reachable: set[Node] = set()
    while grays:
        node = grays.pop()
        seen.add(node)
        for target in refs(node):
            if target not in seen:
                grays.append(target)
        reachable.add(Node(node.type & RESOURCE_MAX, node.namespace, node.key))
    return reachable


def sweep(reachable: set[Node], all_nodes: Iterable[Node], remove: Callable[[Node], object]) -> None:
    """Remove every node of ``all_nodes`` that is not reachable (``gc.Sweep``)."""
    for node in all_nodes:
        if node not in reachable:
            remove(node)
