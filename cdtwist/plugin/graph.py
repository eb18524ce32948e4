# -*- test-case-name: tests.test_plugin_graph -*-
"""Order registrations so every plugin starts after the types it requires.

A port of containerd's ``plugin.Graph``: requirements name *types*, not ids;
``"*"`` means every other plugin; ties keep registration order, so the
result is deterministic.  Unlike containerd, a cycle is an error that names
the plugins involved instead of a silent partial order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from cdtwist.plugin import ALL, PluginError, Registration


class CycleError(PluginError):
    def __init__(self, path: list[str]) -> None:
        self.path = path
        super().__init__("plugin dependency cycle: " + " -> ".join(path))


def graph(
    registrations: Iterable[Registration],
    disabled: Callable[[Registration], bool] = lambda r: False,
) -> list[Registration]:
    regs = [r for r in registrations if not (r.disable or disabled(r))]
    ordered: list[Registration] = []
    done: set[str] = set()
    visiting: list[str] = []

    def visit(reg: Registration) -> None:
        if reg.uri in done:
            return
        if reg.uri in visiting:
            raise CycleError(visiting[visiting.index(reg.uri):] + [reg.uri])
        visiting.append(reg.uri)
        # containerd walks requirements in declared order, then registrations.
        for wanted in reg.requires:
            for dep in regs:
                if dep is reg or not (wanted == ALL or dep.type == wanted):
                    continue
                if wanted == ALL and ALL in dep.requires:
                    # two "everything" plugins don't order each other.
                    continue
                visit(dep)
        visiting.pop()
        done.add(reg.uri)
        ordered.append(reg)

    for reg in regs:
        visit(reg)
    return ordered
