"""ShimTask against an in-process fake shim over a real UNIX socket; shared fakes for the runtime tests.

:class:`FakeShim` serves ``containerd.task.v2.Task`` the way
``containerd-shim-runc-v2`` answers (pids, states, waits that block until
the test ends the process), recording every call with its namespace.
:func:`write_fake_shim_binary` writes an executable that behaves like a
shim binary's ``start`` and ``delete`` commands, recording how it was run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cdtwist.api.runtime.task.v2 import shim_pb2
from cdtwist.api.types import mount_pb2
from cdtwist.api.types.task import task_pb2
from cdtwist.errors import CdtwistError, InvalidArgument, NotFound
from cdtwist.runtime.binary import Exit
from cdtwist.runtime.bundle import Bundle
from cdtwist.runtime.shim import IO, CreateOpts, ExitWatch, ShimClosedError, ShimTask, from_shim_error
from cdtwist.ttrpc import ClosedError, Services, TTRPCServerFactory, connect_unix, listen_ttrpc
from cdtwist.ttrpc.server import CallContext

TASK = shim_pb2.DESCRIPTOR.services_by_name["Task"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def short_tmpdir(case: SynchronousTestCase, prefix: str = "cdtr") -> str:
    """A dir directly under /tmp (socket paths must stay short), removed after the test."""
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    case.addCleanup(shutil.rmtree, path, True)
    return path


def timestamp(seconds: int = 1_700_000_000) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=5)


class FakeShim:
    """``containerd.task.v2.Task`` in process: records calls, answers like the runc shim."""

    def __init__(self, pid: int = 4242) -> None:
        self.pid = pid
        self.calls: list[tuple[str, Any, str | None]] = []
        self.status: dict[str, int] = {}
        self.pids: dict[str, int] = {}
        self.exits: dict[str, tuple[int, timestamp_pb2.Timestamp]] = {}
        self.waiters: dict[str, list[Deferred[shim_pb2.WaitResponse]]] = {}
        #: method name -> exception raised instead of answering
        self.errors: dict[str, BaseException] = {}
        #: method name -> a Deferred answered instead (the test fires it, or never)
        self.held: dict[str, Deferred[Any]] = {}
        self.factory: TTRPCServerFactory | None = None
        self.port: Any = None
        self.path = ""

    # -- serving ----------------------------------------------------------------

    async def listen(self, path: str) -> str:
        services = Services()
        services.register(TASK, self)
        self.factory = TTRPCServerFactory(services, reactor=reactor)
        self.port = await listen_ttrpc(reactor, path, self.factory, os.geteuid(), os.getegid())
        self.path = path
        return "unix://" + path

    def drop(self) -> None:
        """The shim dies: every connection goes (the socket stays, refusing nothing)."""
        if self.factory is not None:
            self.factory.close()

    async def stop(self) -> None:
        self.drop()
        if self.port is not None:
            port, self.port = self.port, None
            await port.stopListening()

    # -- test controls ------------------------------------------------------------

    def exit(self, exec_id: str = "", status: int = 0) -> None:
        """The process ends: waiters answered, state stopped."""
        stamp = timestamp()
        self.exits[exec_id] = (status, stamp)
        self.status[exec_id] = task_pb2.STOPPED
        for d in self.waiters.pop(exec_id, []):
            d.callback(shim_pb2.WaitResponse(exit_status=status, exited_at=stamp))

    def methods(self) -> list[str]:
        return [m for m, _, _ in self.calls]

    def count(self, method: str) -> int:
        return self.methods().count(method)

    def _record(self, method: str, req: Any, ctx: CallContext) -> None:
        self.calls.append((method, req, ctx.namespace))
        err = self.errors.get(method)
        if err is not None:
            raise err

    def _held(self, method: str, answer: Callable[[], Any]) -> Any:
        held = self.held.get(method)
        if held is None:
            return answer()
        return held.addCallback(lambda _: answer())

    def _known(self, exec_id: str) -> None:
        if exec_id not in self.status:
            raise NotFound(f"process {exec_id} does not exist" if exec_id else "container does not exist")

    # -- the Task service -----------------------------------------------------------

    def Create(self, req: shim_pb2.CreateTaskRequest, ctx: CallContext) -> shim_pb2.CreateTaskResponse:  # noqa: N802
        self._record("Create", req, ctx)
        self.status[""] = task_pb2.CREATED
        self.pids[""] = self.pid
        return shim_pb2.CreateTaskResponse(pid=self.pid)

    def Start(self, req: shim_pb2.StartRequest, ctx: CallContext) -> shim_pb2.StartResponse:  # noqa: N802
        self._record("Start", req, ctx)
        self._known(req.exec_id)
        self.status[req.exec_id] = task_pb2.RUNNING
        return shim_pb2.StartResponse(pid=self.pids[req.exec_id])

    def State(self, req: shim_pb2.StateRequest, ctx: CallContext) -> shim_pb2.StateResponse:  # noqa: N802
        self._record("State", req, ctx)
        self._known(req.exec_id)
        status, stamp = self.exits.get(req.exec_id, (0, None))
        resp = shim_pb2.StateResponse(
            id=req.exec_id or req.id,
            pid=self.pids[req.exec_id],
            status=self.status[req.exec_id],
            stdout="/fifo/out",
            exit_status=status,
            exec_id=req.exec_id,
        )
        if stamp is not None:
            resp.exited_at.CopyFrom(stamp)
        return resp

    def Wait(self, req: shim_pb2.WaitRequest, ctx: CallContext) -> Any:  # noqa: N802
        self._record("Wait", req, ctx)
        self._known(req.exec_id)
        if req.exec_id in self.exits:
            status, stamp = self.exits[req.exec_id]
            return shim_pb2.WaitResponse(exit_status=status, exited_at=stamp)
        d: Deferred[shim_pb2.WaitResponse] = Deferred()
        self.waiters.setdefault(req.exec_id, []).append(d)
        return d

    def Delete(self, req: shim_pb2.DeleteRequest, ctx: CallContext) -> shim_pb2.DeleteResponse:  # noqa: N802
        self._record("Delete", req, ctx)
        self._known(req.exec_id)
        if self.status[req.exec_id] not in (task_pb2.STOPPED, task_pb2.CREATED):
            from cdtwist.errors import FailedPrecondition

            raise FailedPrecondition("cannot delete a running process")
        status, stamp = self.exits.get(req.exec_id, (0, timestamp()))
        pid = self.pids[req.exec_id]
        del self.status[req.exec_id]
        self.exits.pop(req.exec_id, None)
        return shim_pb2.DeleteResponse(pid=pid, exit_status=status, exited_at=stamp)

    def Exec(self, req: shim_pb2.ExecProcessRequest, ctx: CallContext) -> empty_pb2.Empty:  # noqa: N802
        self._record("Exec", req, ctx)
        self.status[req.exec_id] = task_pb2.CREATED
        self.pids[req.exec_id] = self.pid + 1 + len(self.pids)
        return empty_pb2.Empty()

    def Kill(self, req: shim_pb2.KillRequest, ctx: CallContext) -> empty_pb2.Empty:  # noqa: N802
        self._record("Kill", req, ctx)
        self._known(req.exec_id)
        if req.signal == 9:
            self.exit(req.exec_id, 137)
        return empty_pb2.Empty()

    def Connect(self, req: shim_pb2.ConnectRequest, ctx: CallContext) -> Any:  # noqa: N802
        self._record("Connect", req, ctx)
        return self._held(
            "Connect",
            lambda: shim_pb2.ConnectResponse(shim_pid=os.getpid(), task_pid=self.pids.get("", self.pid), version="2"),
        )

    def Shutdown(self, req: shim_pb2.ShutdownRequest, ctx: CallContext) -> empty_pb2.Empty:  # noqa: N802
        self._record("Shutdown", req, ctx)
        # The real shim exits: the connection goes right after the answer (or before it).
        reactor.callLater(0, self.drop)
        return empty_pb2.Empty()

    def Stats(self, req: shim_pb2.StatsRequest, ctx: CallContext) -> shim_pb2.StatsResponse:  # noqa: N802
        self._record("Stats", req, ctx)
        return shim_pb2.StatsResponse(stats=any_pb2.Any(type_url="io.containerd.cgroups.v1.Metrics", value=b"\x08\x01"))

    def Pids(self, req: shim_pb2.PidsRequest, ctx: CallContext) -> shim_pb2.PidsResponse:  # noqa: N802
        self._record("Pids", req, ctx)
        return shim_pb2.PidsResponse(processes=[task_pb2.ProcessInfo(pid=p) for p in sorted(self.pids.values())])

    def _empty(name: str) -> Callable[..., empty_pb2.Empty]:  # type: ignore[misc]
        def handler(self: FakeShim, req: Any, ctx: CallContext) -> empty_pb2.Empty:
            self._record(name, req, ctx)
            if name in ("Pause", "Resume"):
                self._known("")
                self.status[""] = task_pb2.PAUSED if name == "Pause" else task_pb2.RUNNING
            return empty_pb2.Empty()

        handler.__name__ = name
        return handler

    Pause = _empty("Pause")
    Resume = _empty("Resume")
    CloseIO = _empty("CloseIO")
    ResizePty = _empty("ResizePty")
    Update = _empty("Update")
    Checkpoint = _empty("Checkpoint")
    del _empty


_FAKE_BINARY = """#!{python}
# A fake shim binary for cdtwist's runtime tests: records each run, answers start/delete.
import json, os, sys
RECORD = {record!r}
ADDRESS = {address!r}
DELETE_RESPONSE = bytes.fromhex({delete!r})
FAIL = {fail!r}
args = sys.argv[1:]
data = sys.stdin.buffer.read()
env = {{k: os.environ.get(k) for k in ("GOMAXPROCS", "TTRPC_ADDRESS", "SCHED_CORE")}}
with open(RECORD, "a") as f:
    f.write(json.dumps({{"argv": sys.argv, "cwd": os.getcwd(), "env": env, "stdin": data.hex()}}) + "\\n")
if FAIL and args[-1] == FAIL:
    sys.stdout.write("fake shim refuses to " + FAIL)
    sys.stderr.write("some detail")
    sys.exit(1)
if args[-1] == "start":
    with open("address", "w") as f:
        f.write(ADDRESS)
    sys.stdout.write(ADDRESS + "\\n")
elif args[-1] == "delete":
    sys.stderr.write("cleanup noise\\n")
    sys.stdout.buffer.write(DELETE_RESPONSE)
"""


def write_fake_shim_binary(
    directory: str,
    address: str,
    *,
    delete_response: shim_pb2.DeleteResponse | None = None,
    fail: str = "",
    name: str = "containerd-shim-fake-v2",
) -> tuple[str, str]:
    """An executable shim stand-in; returns (its path, the file its runs are recorded in)."""
    record = os.path.join(directory, name + ".runs")
    path = os.path.join(directory, name)
    response = delete_response or shim_pb2.DeleteResponse(pid=4242, exit_status=137, exited_at=timestamp())
    with open(path, "w") as f:
        f.write(
            _FAKE_BINARY.format(
                python=sys.executable,
                record=record,
                address=address,
                delete=response.SerializeToString().hex(),
                fail=fail,
            )
        )
    os.chmod(path, 0o755)
    return path, record


def read_runs(record: str) -> list[dict[str, Any]]:
    try:
        with open(record) as f:
            return [json.loads(line) for line in f]
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------------


class ExitWatchTests(SynchronousTestCase):
    """One shim Wait per process, however many waiters."""

    def test_waiters_share_one_call_and_the_result_is_kept(self) -> None:
        starts: list[Deferred[Exit]] = []

        def start() -> Deferred[Exit]:
            d: Deferred[Exit] = Deferred()
            starts.append(d)
            return d

        watch = ExitWatch(start)
        waits = [watch.wait() for _ in range(50)]
        self.assertEqual(len(starts), 1)
        self.assertEqual(watch.waiting, 50)
        for d in waits:
            self.assertNoResult(d)
        exit = Exit(status=3)
        starts[0].callback(exit)
        for d in waits:
            self.assertIs(self.successResultOf(d), exit)
        # later waiters get the kept answer without another call
        self.assertIs(self.successResultOf(watch.wait()), exit)
        self.assertEqual(len(starts), 1)
        self.assertIs(watch.exit, exit)

    def test_failure_is_not_kept(self) -> None:
        starts: list[Deferred[Exit]] = []
        watch = ExitWatch(lambda: starts.append(Deferred()) or starts[-1])  # type: ignore[func-returns-value]
        a, b = watch.wait(), watch.wait()
        starts[0].errback(ShimClosedError())
        self.failureResultOf(a, ShimClosedError)
        self.failureResultOf(b, ShimClosedError)
        c = watch.wait()
        self.assertEqual(len(starts), 2)  # asked again
        starts[1].callback(Exit(status=0))
        self.assertEqual(self.successResultOf(c).status, 0)

    def test_cancelled_waiter_is_forgotten(self) -> None:
        starts: list[Deferred[Exit]] = []
        watch = ExitWatch(lambda: starts.append(Deferred()) or starts[-1])  # type: ignore[func-returns-value]
        a, b = watch.wait(), watch.wait()
        a.cancel()
        self.failureResultOf(a)
        self.assertEqual(watch.waiting, 1)
        starts[0].callback(Exit(status=1))
        self.assertEqual(self.successResultOf(b).status, 1)


class ErrorTests(SynchronousTestCase):
    def test_closed_reads_as_go(self) -> None:
        err = from_shim_error(ClosedError())
        self.assertIsInstance(err, ShimClosedError)
        self.assertEqual(str(err), "ttrpc: closed")
        nf = NotFound("x")
        self.assertIs(from_shim_error(nf), nf)

    def test_create_opts_prefer_task_options(self) -> None:
        runtime = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"r")
        task = any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"t")
        self.assertIs(CreateOpts(spec=b"{}", runtime_options=runtime).options, runtime)
        self.assertIs(CreateOpts(spec=b"{}", runtime_options=runtime, task_options=task).options, task)
        self.assertIsNone(CreateOpts(spec=b"{}").options)


class ShimTaskTests(TestCase):
    """The task API over a real connection to :class:`FakeShim`."""

    timeout = 20

    def setUp(self) -> Deferred[None]:
        self.dir = short_tmpdir(self)
        self.fake = FakeShim()
        self.closed_runs = 0

        async def setup() -> None:
            address = await self.fake.listen(os.path.join(self.dir, "s.sock"))
            self.addCleanup(lambda: ensureDeferred(self.fake.stop()))
            client = await connect_unix(reactor, address[len("unix://"):])
            bundle = Bundle(id="c1", path=os.path.join(self.dir, "bundle"), namespace="ns1")

            def on_close() -> None:
                self.closed_runs += 1

            self.shim = ShimTask(bundle, client, on_close=on_close)
            self.addCleanup(self.shim.detach)

        return ensureDeferred(setup())

    def test_create_request_and_namespace(self) -> Deferred[None]:
        async def run() -> None:
            opts = CreateOpts(
                spec=b"{}",
                io=IO(stdin="/f/in", stdout="/f/out", stderr="/f/err", terminal=True),
                rootfs=[mount_pb2.Mount(type="overlay", source="overlay", options=["lowerdir=/a"])],
                checkpoint="/cp",
                runtime_options=any_pb2.Any(type_url="containerd.runc.v1.Options", value=b"\x30\x01"),
            )
            pid = await self.shim.create(opts)
            self.assertEqual(pid, 4242)
            method, req, ns = self.fake.calls[-1]
            self.assertEqual((method, ns), ("Create", "ns1"))
            self.assertEqual(req.id, "c1")
            self.assertEqual(req.bundle, self.shim.bundle.path)
            self.assertEqual((req.stdin, req.stdout, req.stderr, req.terminal), ("/f/in", "/f/out", "/f/err", True))
            self.assertEqual(req.checkpoint, "/cp")
            self.assertEqual(list(req.rootfs[0].options), ["lowerdir=/a"])
            self.assertEqual(req.options.type_url, "containerd.runc.v1.Options")
            self.assertEqual(await self.shim.pid(), 4242)
            self.assertEqual(await self.shim.start(), 4242)
            state = await self.shim.state()
            self.assertEqual((state.pid, state.status, state.stdout), (4242, task_pb2.RUNNING, "/fifo/out"))

        return ensureDeferred(run())

    def test_every_call_carries_id_and_namespace(self) -> Deferred[None]:
        async def run() -> None:
            await self.shim.create(CreateOpts(spec=b"{}"))
            await self.shim.start()
            await self.shim.pause()
            await self.shim.resume()
            await self.shim.resize_pty(80, 24)
            await self.shim.close_io()
            await self.shim.update(any_pb2.Any(type_url="x", value=b""), {"a": "b"})
            await self.shim.checkpoint("/img", None)
            stats = await self.shim.stats()
            self.assertEqual(stats.type_url, "io.containerd.cgroups.v1.Metrics")
            self.assertEqual([p.pid for p in await self.shim.pids()], [4242])
            await self.shim.exec("e1", IO(stdout="/o"), any_pb2.Any(type_url="types.containerd.io/x", value=b"{}"))
            self.assertEqual(await self.shim.process("e1"), "e1")
            await self.shim.kill(9, all=True)
            for method, req, ns in self.fake.calls:
                self.assertEqual(ns, "ns1", method)
                self.assertEqual(req.id, "c1", method)
            kill = self.fake.calls[-1][1]
            self.assertEqual((kill.signal, kill.all), (9, True))
            resize = next(r for m, r, _ in self.fake.calls if m == "ResizePty")
            self.assertEqual((resize.width, resize.height), (80, 24))
            close = next(r for m, r, _ in self.fake.calls if m == "CloseIO")
            self.assertTrue(close.stdin)
            update = next(r for m, r, _ in self.fake.calls if m == "Update")
            self.assertEqual(dict(update.annotations), {"a": "b"})

        return ensureDeferred(run())

    def test_exec_id_validated_before_the_shim(self) -> Deferred[None]:
        async def run() -> None:
            with self.assertRaises(InvalidArgument) as e:
                await self.shim.exec("bad/id", IO(), None)
            self.assertIn("invalid exec id bad/id: identifier", str(e.exception))
            self.assertEqual(self.fake.calls, [])

        return ensureDeferred(run())

    def test_shim_errors_keep_their_class(self) -> Deferred[None]:
        async def run() -> None:
            with self.assertRaises(NotFound) as e:
                await self.shim.state("nope")
            self.assertEqual(str(e.exception), "process nope does not exist: not found")
            self.fake.errors["Start"] = CdtwistError("OCI runtime start failed: boom: unknown")
            await self.shim.create(CreateOpts(spec=b"{}"))
            with self.assertRaises(CdtwistError) as e2:
                await self.shim.start()
            self.assertEqual(str(e2.exception), "OCI runtime start failed: boom: unknown")

        return ensureDeferred(run())

    def test_waits_are_shared(self) -> Deferred[None]:
        async def run() -> None:
            await self.shim.create(CreateOpts(spec=b"{}"))
            await self.shim.start()
            waits = [self.shim.wait() for _ in range(50)]
            await self.shim.state()  # the Wait request is on the wire before this answer
            self.assertEqual(self.fake.count("Wait"), 1)
            self.assertEqual(self.shim.waiting(), 50)
            self.fake.exit("", 3)
            exits = await gatherResults(waits)
            self.assertEqual({e.status for e in exits}, {3})
            again = await self.shim.wait()
            self.assertEqual(again.status, 3)
            self.assertEqual(self.fake.count("Wait"), 1)

        return ensureDeferred(run())

    def test_exec_wait_forgotten_on_delete(self) -> Deferred[None]:
        async def run() -> None:
            await self.shim.create(CreateOpts(spec=b"{}"))
            await self.shim.exec("e1", IO(), None)
            await self.shim.start("e1")
            d = self.shim.wait("e1")
            await self.shim.state("e1")
            self.fake.exit("e1", 7)
            self.assertEqual((await d).status, 7)
            exit = await self.shim.delete_process("e1")
            self.assertEqual(exit.status, 7)
            # a new exec under the same id is waited for afresh
            await self.shim.exec("e1", IO(), None)
            await self.shim.start("e1")
            d2 = self.shim.wait("e1")
            await self.shim.state("e1")
            self.assertNoResult(d2)
            self.assertEqual(self.fake.count("Wait"), 2)
            self.fake.exit("e1", 0)
            self.assertEqual((await d2).status, 0)

        return ensureDeferred(run())

    def test_lost_connection(self) -> Deferred[None]:
        async def run() -> None:
            await self.shim.create(CreateOpts(spec=b"{}"))
            waiting = self.shim.wait()
            await self.shim.state()
            self.fake.drop()
            with self.assertRaises(ShimClosedError):
                await waiting
            await self.shim.close_handled
            self.assertEqual(self.closed_runs, 1)
            # containerd: State on a closed connection is "not found", other calls "ttrpc: closed"
            with self.assertRaises(NotFound):
                await self.shim.state()
            with self.assertRaises(ShimClosedError):
                await self.shim.kill(9)
            await self.shim.shutdown()  # closed is the expected answer to Shutdown

        return ensureDeferred(run())

    def test_close_runs_the_handler_at_once(self) -> Deferred[None]:
        """As Go's client: the on-close callback runs once close() dropped the connection, not later."""

        async def run() -> None:
            self.shim.close()
            self.assertEqual(self.closed_runs, 1)
            self.assertTrue(self.shim.close_handled.called)
            await self.shim.closed  # the transport's loss still comes
            self.shim.close()
            self.assertEqual(self.closed_runs, 1)  # once only

        return ensureDeferred(run())

    def test_detach_skips_the_close_handler(self) -> Deferred[None]:
        async def run() -> None:
            self.shim.detach()
            await self.shim.close_handled
            self.assertEqual(self.closed_runs, 0)

        return ensureDeferred(run())
