"""The plugin dependency order, checked against containerd's Graph rules."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cdtwist.plugin import ALL, PluginError, Registration, Registry
from cdtwist.plugin.graph import CycleError, graph


def reg(type_: str, id_: str, *requires: str) -> Registration:
    return Registration(type=type_, id=id_, init=lambda ic: None, requires=tuple(requires))


def uris(regs: list[Registration]) -> list[str]:
    return [r.uri for r in regs]


class GraphTests(SynchronousTestCase):
    def test_registration_order_without_requirements(self) -> None:
        regs = [reg("t.a", "1"), reg("t.b", "2"), reg("t.c", "3")]
        self.assertEqual(uris(graph(regs)), ["t.a.1", "t.b.2", "t.c.3"])

    def test_requirements_come_first_by_type(self) -> None:
        regs = [
            reg("grpc", "namespaces", "service"),
            reg("service", "ns-service", "metadata", "event"),
            reg("metadata", "bolt"),
            reg("event", "exchange"),
            reg("metadata", "other"),
        ]
        # containerd walks requires in declared order, then registrations:
        # every metadata plugin, then every event plugin.
        self.assertEqual(
            uris(graph(regs)),
            ["metadata.bolt", "metadata.other", "event.exchange", "service.ns-service", "grpc.namespaces"],
        )

    def test_star_requires_everything_else(self) -> None:
        regs = [reg("a", "1"), reg("late", "x", ALL), reg("b", "2"), reg("c", "3", "b")]
        self.assertEqual(uris(graph(regs)), ["a.1", "b.2", "c.3", "late.x"])

    def test_two_star_plugins_do_not_loop(self) -> None:
        regs = [reg("x", "1", ALL), reg("y", "2", ALL), reg("a", "3")]
        ordered = uris(graph(regs))
        self.assertEqual(sorted(ordered), ["a.3", "x.1", "y.2"])
        self.assertLess(ordered.index("a.3"), ordered.index("x.1"))

    def test_disabled_plugins_are_dropped_and_not_required(self) -> None:
        regs = [reg("m", "bolt"), reg("s", "svc", "m")]
        ordered = graph(regs, disabled=lambda r: r.uri == "m.bolt")
        self.assertEqual(uris(ordered), ["s.svc"])

    def test_cycle_is_an_error_naming_the_plugins(self) -> None:
        regs = [reg("a", "1", "b"), reg("b", "2", "c"), reg("c", "3", "a")]
        err = self.assertRaises(CycleError, graph, regs)
        self.assertEqual(err.path, ["a.1", "b.2", "c.3", "a.1"])
        self.assertIn("a.1 -> b.2 -> c.3 -> a.1", str(err))

    def test_self_type_requirement_is_not_a_cycle(self) -> None:
        regs = [reg("snap", "native"), reg("snap", "overlay", "snap")]
        self.assertEqual(uris(graph(regs)), ["snap.native", "snap.overlay"])

    def test_deterministic(self) -> None:
        regs = [reg(f"t{i % 3}", str(i), f"t{(i + 1) % 3}") for i in range(1, 3)] + [reg("t0", "0")]
        self.assertEqual(uris(graph(regs)), uris(graph(list(regs))))


class RegistrationTests(SynchronousTestCase):
    def test_uri(self) -> None:
        self.assertEqual(reg("io.containerd.grpc.v1", "version").uri, "io.containerd.grpc.v1.version")

    def test_empty_type_or_id_rejected(self) -> None:
        self.assertRaises(PluginError, reg, "", "x")
        self.assertRaises(PluginError, reg, "t", "")

    def test_star_mixed_with_types_rejected(self) -> None:
        self.assertRaises(PluginError, reg, "t", "x", ALL, "other")

    def test_duplicate_uri_rejected(self) -> None:
        registry = Registry()
        registry.register(reg("t", "x"))
        self.assertRaises(PluginError, registry.register, reg("t", "x"))
        self.assertEqual(len(registry), 1)
