"""The plugin tree: ordered start awaited one by one, reverse stop, outcomes recorded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase

from cdtwist.plugin import Registration, SkipPlugin
from cdtwist.plugin.context import InitContext
from cdtwist.plugin.graph import graph
from cdtwist.plugin.loader import load_plugin_dir
from cdtwist.plugin.service import PluginTree, RequiredPluginError


@dataclass
class Knob:
    size: int = 3


class Recorder:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.pending: dict[str, Deferred[Any]] = {}


def make_reg(
    rec: Recorder,
    type_: str,
    id_: str,
    *requires: str,
    fail: Exception | None = None,
    hold: bool = False,
    config: type | None = None,
) -> Registration:
    def init(ic: InitContext) -> Any:
        rec.events.append(f"init {ic.registration.uri}")
        if fail is not None:
            raise fail

        class Instance:
            def start(self) -> Any:
                rec.events.append(f"start {ic.registration.uri}")
                if hold:
                    d: Deferred[None] = Deferred()
                    rec.pending[ic.registration.uri] = d
                    return d
                return None

            def stop(self) -> None:
                rec.events.append(f"stop {ic.registration.uri}")

        inst = Instance()
        inst.ic = ic  # type: ignore[attr-defined]
        return inst

    return Registration(type=type_, id=id_, init=init, requires=tuple(requires), config=config)


def make_tree(regs: list[Registration], required: set[str] | None = None) -> PluginTree:
    return PluginTree(
        graph(regs),
        root="/r",
        state="/s",
        daemon_config=None,
        decode_config=lambda reg: reg.config() if reg.config else None,
        required=required or set(),
        reactor=None,  # type: ignore[arg-type]
        io_pool=ThreadPool(0, 1),
    )


class PluginTreeTests(SynchronousTestCase):
    def test_start_waits_for_each_plugin_in_graph_order(self) -> None:
        rec = Recorder()
        tree = make_tree([make_reg(rec, "svc", "b", "db"), make_reg(rec, "db", "a", hold=True)])
        d = tree.startService()
        # b requires a's type: nothing of b happens until a's start fires.
        self.assertEqual(rec.events, ["init db.a", "start db.a"])
        self.assertNoResult(d)
        rec.pending["db.a"].callback(None)
        self.successResultOf(d)
        self.assertEqual(rec.events, ["init db.a", "start db.a", "init svc.b", "start svc.b"])

    def test_stop_runs_in_reverse(self) -> None:
        rec = Recorder()
        tree = make_tree([make_reg(rec, "a", "1"), make_reg(rec, "b", "2", "a"), make_reg(rec, "c", "3", "b")])
        self.successResultOf(tree.startService())
        rec.events.clear()
        self.successResultOf(tree.stopService())
        self.assertEqual(rec.events, ["stop c.3", "stop b.2", "stop a.1"])

    def test_skip_and_failure_are_recorded_and_boot_goes_on(self) -> None:
        rec = Recorder()
        tree = make_tree(
            [
                make_reg(rec, "snap", "btrfs", fail=SkipPlugin("path /x must be a btrfs filesystem")),
                make_reg(rec, "snap", "broken", fail=RuntimeError("disk on fire")),
                make_reg(rec, "svc", "ok", "snap"),
            ]
        )
        self.successResultOf(tree.startService())
        by_id = {p.registration.id: p for p in tree.plugins.all()}
        self.assertTrue(by_id["btrfs"].skipped)
        self.assertEqual(by_id["btrfs"].error_message(), "path /x must be a btrfs filesystem: skip plugin")
        self.assertFalse(by_id["broken"].skipped)
        self.assertEqual(by_id["broken"].error_message(), "disk on fire")
        self.assertIsNone(by_id["ok"].error)
        self.assertEqual(tree.plugins.get_by_type("snap"), {})
        # A real failure is logged with its traceback; a skip is not.
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_required_plugin_failure_fails_start(self) -> None:
        rec = Recorder()
        tree = make_tree(
            [make_reg(rec, "a", "1", fail=RuntimeError("nope")), make_reg(rec, "b", "2")], required={"a.1"}
        )
        failure = self.failureResultOf(tree.startService(), RequiredPluginError)
        self.assertIn("load required plugin a.1: nope", str(failure.value))
        self.assertEqual(rec.events, ["init a.1"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_required_plugin_missing_fails_before_any_init(self) -> None:
        rec = Recorder()
        tree = make_tree([make_reg(rec, "a", "1")], required={"io.containerd.grpc.v1.cri"})
        failure = self.failureResultOf(tree.startService(), RequiredPluginError)
        self.assertIn("io.containerd.grpc.v1.cri", str(failure.value))
        self.assertEqual(rec.events, [])

    def test_context_dirs_and_config(self) -> None:
        rec = Recorder()
        tree = make_tree([make_reg(rec, "io.x.v1", "thing", config=Knob)])
        self.successResultOf(tree.startService())
        inst = tree.plugins.get_by_id("io.x.v1", "thing")
        self.assertEqual(inst.ic.root, os.path.join("/r", "io.x.v1.thing"))
        self.assertEqual(inst.ic.state, os.path.join("/s", "io.x.v1.thing"))
        self.assertEqual(inst.ic.config, Knob(size=3))

    def test_get_returns_first_instance_of_type(self) -> None:
        rec = Recorder()
        tree = make_tree([make_reg(rec, "a", "1"), make_reg(rec, "a", "2"), make_reg(rec, "b", "x", "a")])
        self.successResultOf(tree.startService())
        first = tree.plugins.get("a")
        self.assertIs(first, tree.plugins.get_by_id("a", "1"))
        self.assertEqual(sorted(tree.plugins.get_by_type("a")), ["1", "2"])


class PluginDirTests(SynchronousTestCase):
    def test_plugin_dir_modules_register(self) -> None:
        from cdtwist.plugin import registry

        d = self.mktemp()
        os.makedirs(d)
        with open(os.path.join(d, "hello_plugin.py"), "w") as f:
            f.write(
                "from cdtwist.plugin import Registration, register\n"
                "register(Registration(type='io.example.v1', id='hello', init=lambda ic: 'hi'))\n"
            )
        self.addCleanup(lambda: registry._regs.pop("io.example.v1.hello", None))
        self.assertEqual(load_plugin_dir(d), ["cdtwist_plugin_dir.hello_plugin"])
        self.assertIsNotNone(registry.get("io.example.v1.hello"))

    def test_missing_plugin_dir_is_not_an_error(self) -> None:
        self.assertEqual(load_plugin_dir("/nonexistent/cdtwist/plugins"), [])
