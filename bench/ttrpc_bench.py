#!/usr/bin/env python3
"""Benchmark cdtwist's ttrpc server against Go's, and the daemon's TLS-TCP gRPC path against UNIX.

One run, one table.  Two parts:

* ttrpc: cdtwist's Python server (``cdtwist.ttrpc`` on a real reactor, in a
  process of its own: this script re-run as ``serve-python``) against
  github.com/containerd/ttrpc's server (``bench/ttrpc_go``), both on UNIX
  sockets, both driven by the same Go ttrpc client.  The call is
  ``containerd.task.v2.Task/State``, whose id the server echoes back:
  once small (5 bytes), once 64 KiB each way.  Sequential latency p50/p99
  over ``--calls`` calls and calls/s with 1, 16 and 64 concurrent calls on
  one connection and 64 spread over 4 connections, each number in
  alternating (ABBA) blocks so background drift hits both servers.
* gRPC: ``Version`` latency against a real cdtwist daemon (spawned as
  bench/daemon_bench.py does) over its TLS-TCP listener
  (``[grpc] tcp_address`` on 127.0.0.1 with ``tcp_tls_cert/key/ca`` from
  tests/support_tls.make_pki, so the client presents a certificate) and
  over its UNIX socket, from the same Go gRPC client, in ABBA blocks.

Every loop is bounded; every process and the temp dir are removed on exit,
Ctrl-C and SIGTERM included.

    python3 bench/ttrpc_bench.py [--quick] [--json out.json] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from benchlib import (
    REPO,
    TWISTD_BOOTSTRAP,
    BenchError,
    Interrupted,
    Reaper,
    cpu_seconds,
    go_build,
    loadavg,
    log,
    run_json,
    summarize_us,
)

GO_SRC = REPO / "bench" / "ttrpc_go" / "main.go"

#: Go's gogo stdtime (non-nullable) always sends exited_at as 0001-01-01; the
#: Python server sends it too, so both answer with the same bytes.
GO_ZERO_TIME_S = -62135596800

SMALL, BIG = 0, 64 << 10
SIZE_LABEL = {SMALL: "small (5 B id)", BIG: "64 KiB id, echoed"}
#: (concurrent calls, connections) per throughput row
LOADS: list[tuple[int, int]] = [(1, 1), (16, 1), (64, 1), (64, 4)]
PY, GO = "py", "go"
UNIX, TLS = "unix", "tls-tcp"

READY_TIMEOUT_S = 20.0
#: a loopback round trip this slow is a write held back by Nagle until the peer's delayed ACK
NAGLE_HINT_US = 30_000.0


# --------------------------------------------------------------------------- the Python server process


def serve_python(path: str) -> int:
    """``serve-python SOCK``: cdtwist's ttrpc server on the default reactor until stdin closes."""
    sys.path.insert(0, str(REPO))
    from twisted.internet import reactor
    from twisted.python.failure import Failure

    from cdtwist.api.runtime.task.v2 import shim_pb2
    from cdtwist.ttrpc import CallContext, Services, listen_ttrpc

    class Bench:
        """Echoes the id, like bench/ttrpc_go's server."""

        def State(self, req: shim_pb2.StateRequest, ctx: CallContext) -> shim_pb2.StateResponse:  # noqa: N802
            resp = shim_pb2.StateResponse(id=req.id, pid=1)
            resp.exited_at.seconds = GO_ZERO_TIME_S
            return resp

    services = Services()
    services.register(shim_pb2.DESCRIPTOR.services_by_name["Task"], Bench())
    status = [0]

    def ready(port: object) -> None:
        print("READY", flush=True)

    def failed(failure: Failure) -> None:
        print(f"ERROR {failure.getErrorMessage()}", flush=True)
        status[0] = 1
        reactor.stop()  # type: ignore[attr-defined]

    def start() -> None:
        listen_ttrpc(reactor, path, services, os.geteuid(), os.getegid()).addCallbacks(ready, failed)

    def watch_stdin() -> None:
        # The bench holds our stdin: when it goes away (even SIGKILLed), so do we.
        sys.stdin.buffer.read()
        reactor.callFromThread(reactor.stop)  # type: ignore[attr-defined]

    threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return status[0]


# --------------------------------------------------------------------------- processes


def wait_ready(proc: subprocess.Popen[bytes], what: str, logfile: Path, timeout: float = READY_TIMEOUT_S) -> None:
    """Read the child's stdout until its READY line (bounded)."""
    assert proc.stdout is not None
    out: IO[bytes] = proc.stdout
    deadline = time.monotonic() + timeout
    seen = b""
    with selectors.DefaultSelector() as sel:
        sel.register(out, selectors.EVENT_READ)
        while b"READY" not in seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{what} not ready after {timeout}s: {tail(logfile)}")
            if sel.select(left):
                chunk = os.read(out.fileno(), 4096)
                if not chunk:
                    raise BenchError(f"{what} exited ({proc.wait()}): {seen.decode(errors='replace')}{tail(logfile)}")
                seen += chunk
                if b"ERROR" in seen:
                    raise BenchError(f"{what} failed: {seen.decode(errors='replace').strip()}")


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def python_env(tmp: Path) -> dict[str, str]:
    """This checkout on PYTHONPATH; bytecode cached in the temp dir, as an installed package has it."""
    py_path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return dict(os.environ, PYTHONPATH=py_path, PYTHONDONTWRITEBYTECODE="", PYTHONPYCACHEPREFIX=str(tmp / "pycache"))


def build_go(tmp: Path) -> Path:
    """``go build`` bench/ttrpc_go (the Go ttrpc server and every load client) into the temp dir."""
    needs = ("github.com/containerd/ttrpc", "google.golang.org/grpc", "github.com/containerd/containerd")
    return go_build(tmp, GO_SRC, "ttrpcbench", needs, timeout=600)


# --------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    sock: str
    proc: subprocess.Popen[bytes]
    calls_total: int = 0
    cpu_s: float = 0.0


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    reaper: Reaper
    binary: Path
    counter: int = 0
    pids: dict[str, int] = field(default_factory=dict)

    def _dir(self, tag: str) -> Path:
        self.counter += 1
        d = self.tmp / f"{tag}{self.counter}"
        d.mkdir()
        return d

    @contextmanager
    def ttrpc_server(self, name: str) -> Iterator[Server]:
        d = self._dir(name)
        sock = str(d / "t.sock")
        logfile = d / "server.log"
        if name == PY:
            argv = [sys.executable, str(Path(__file__).resolve()), "serve-python", sock]
            env = python_env(self.tmp)
        else:
            argv = [str(self.binary), "server", "-addr", sock]
            env = dict(os.environ)
        with open(logfile, "wb") as err:
            proc = self.reaper.spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env, cwd=d)
        try:
            wait_ready(proc, f"{name} ttrpc server", logfile)
            yield Server(name, sock, proc)
        finally:
            rc = self.reaper.stop(proc)
            if rc not in (0, None, -signal.SIGTERM):
                log(f"{name} ttrpc server exited with {rc}:{tail(logfile)}")

    def client(self, mode: str, sock: str, *extra: str, timeout: float) -> dict[str, Any]:
        return run_json([str(self.binary), mode, "-addr", sock, *extra], timeout)

    # -- ttrpc ---------------------------------------------------------------

    def ttrpc(self) -> dict[str, Any]:
        a = self.args
        names = [PY, GO]
        out: dict[str, Any] = {}
        with ExitStack() as stack:
            servers = {n: stack.enter_context(self.ttrpc_server(n)) for n in names}
            self.pids = {n: s.proc.pid for n, s in servers.items()}
            for n, s in servers.items():
                log(f"{n} ttrpc server pid {s.proc.pid}: RSS {rss_mib(s.proc.pid):.1f} MiB")
            for size in (SMALL, BIG):
                out[str(size)] = self._ttrpc_size(servers, size)
            for n, s in servers.items():
                out.setdefault("rss_mib_after", {})[n] = rss_mib(s.proc.pid)
            if a.profile:
                out["profile"] = {str(size): self.profile(servers[PY], size) for size in (SMALL, BIG)}
        return out

    def _measured(self, server: Server, run: Any) -> dict[str, Any]:
        """Run one client block; charge the server's CPU over it to the calls it served."""
        cpu0 = cpu_seconds(server.proc.pid)
        r = run()
        cpu = cpu_seconds(server.proc.pid) - cpu0
        r["server_cpu_s"] = cpu
        r["server_cpu_us_per_call"] = cpu / max(1, r["calls_total"]) * 1e6
        return r

    def _ttrpc_size(self, servers: dict[str, Server], size: int) -> dict[str, Any]:
        a = self.args
        names = list(servers)
        res: dict[str, dict[str, Any]] = {n: {"throughput": {}} for n in names}
        # Sequential latency: --calls split into --blocks alternating blocks.
        blocks = [a.calls // a.blocks + (1 if i < a.calls % a.blocks else 0) for i in range(a.blocks)]
        samples: dict[str, list[int]] = {n: [] for n in names}
        block_p50: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        log(f"ttrpc State {SIZE_LABEL[size]}: {a.calls} sequential calls each, {a.blocks} ABBA blocks")
        for b, n_calls in enumerate(blocks):
            for n in names if b % 2 == 0 else reversed(names):
                warm = a.warmup if b == 0 else min(a.warmup, 50)
                argv = ["-n", str(n_calls), "-warmup", str(warm), "-size", str(size), "-samples"]
                r = self._measured(
                    servers[n], lambda n=n, argv=argv: self.client("latency", servers[n].sock, *argv, timeout=120)
                )
                samples[n].extend(r["samples_ns"])
                block_p50[n].append(r["stats"]["p50_us"])
                cpu[n].append(r["server_cpu_us_per_call"])
        for n in names:
            res[n]["latency"] = {
                "stats": summarize_us(samples[n]),
                "block_p50_us": block_p50[n],
                "server_cpu_us_per_call": statistics.fmean(cpu[n]),
            }
        # Throughput: each load in --tp-blocks alternating blocks of --duration seconds.
        for conc, conns in LOADS:
            key = f"c{conc}x{conns}"
            log(
                f"ttrpc State {SIZE_LABEL[size]}: {conc} concurrent on {conns} conn(s), "
                f"{a.tp_blocks} x {a.duration}s each"
            )
            runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
            for b in range(a.tp_blocks):
                for n in names if b % 2 == 0 else reversed(names):
                    argv = [
                        "-c",
                        str(conc),
                        "-conns",
                        str(conns),
                        "-d",
                        f"{a.duration}s",
                        "-warmup",
                        f"{a.tp_warmup}s",
                        "-size",
                        str(size),
                    ]
                    runs[n].append(
                        self._measured(
                            servers[n],
                            lambda n=n, argv=argv: self.client(
                                "throughput", servers[n].sock, *argv, timeout=a.duration + a.tp_warmup + 60
                            ),
                        )
                    )
            for n in names:
                rs = runs[n]
                ok, wall = sum(r["ok"] for r in rs), sum(r["wall_s"] for r in rs)
                errors = sum(r["errors"] for r in rs)
                res[n]["throughput"][key] = {
                    "concurrency": conc,
                    "conns": conns,
                    "ok": ok,
                    "errors": errors,
                    "first_error": next((r["first_error"] for r in rs if r["first_error"]), ""),
                    "calls_per_s": ok / wall if wall else 0.0,
                    "block_calls_per_s": [r["calls_per_s"] for r in rs],
                    "p50_us": statistics.fmean(r["stats"].get("p50_us", 0.0) for r in rs),
                    "p99_us": statistics.fmean(r["stats"].get("p99_us", 0.0) for r in rs),
                    "server_cpu_us_per_call": sum(r["server_cpu_s"] for r in rs)
                    / max(1, sum(r["calls_total"] for r in rs))
                    * 1e6,
                }
                if errors:
                    log(f"{n}: {errors} errors, first: {res[n]['throughput'][key]['first_error']}")
        return res

    # -- profile ---------------------------------------------------------------

    def profile(self, server: Server, size: int) -> dict[str, Any]:
        """py-spy the Python server under 16 concurrent calls; top self-time lines."""
        a = self.args
        py_spy = shutil.which("py-spy")
        if py_spy is None:
            log("py-spy not found (pip install py-spy): no profile")
            return {}
        raw = self.tmp / f"pyspy-{size}.txt"
        log(f"profiling the Python server (py-spy, {a.profile_seconds}s, State {SIZE_LABEL[size]}, 16 concurrent)")
        spy = self.reaper.spawn(
            [
                py_spy,
                "record",
                "-p",
                str(server.proc.pid),
                "-r",
                "500",
                "-d",
                str(int(a.profile_seconds + 1)),
                "--nonblocking",
                "-f",
                "raw",
                "-o",
                str(raw),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            time.sleep(0.5)  # py-spy attaches
            self.client(
                "throughput",
                server.sock,
                "-c",
                "16",
                "-d",
                f"{a.profile_seconds}s",
                "-size",
                str(size),
                timeout=a.profile_seconds + 60,
            )
            try:
                spy.wait(a.profile_seconds + 30)
            except subprocess.TimeoutExpired:
                log("py-spy did not finish")
        finally:
            stderr = spy.stderr.read().decode(errors="replace") if spy.stderr and spy.poll() is not None else ""
            self.reaper.stop(spy)
        if not raw.exists():
            log(f"py-spy wrote nothing: {stderr.strip()[-400:]}")
            return {}
        if a.profile_raw:
            kept = Path(f"{a.profile_raw}-{size}.txt")
            shutil.copy(raw, kept)
            log(f"raw py-spy stacks (flamegraph input) in {kept}")
        return hotspots(raw.read_text(errors="replace"), a.profile_top)

    # -- gRPC over TLS-TCP vs UNIX ---------------------------------------------

    @contextmanager
    def daemon(self) -> Iterator[dict[str, Any]]:
        sys.path.insert(0, str(REPO))
        from tests.support_tls import make_pki

        d = self._dir("cd")
        pki_dir = d / "pki"
        pki_dir.mkdir()
        pki = make_pki(str(pki_dir))
        port = free_port()
        cfg = d / "config.toml"
        cfg.write_text(CONFIG_TEMPLATE.format(d=d, port=port, cert=pki.server_cert, key=pki.server_key, ca=pki.ca))
        logfile = d / "daemon.log"
        argv = [sys.executable, "-c", TWISTD_BOOTSTRAP, "-n", "--pidfile=", "cdtwist", "-c", str(cfg)]
        with open(logfile, "wb") as out:
            proc = self.reaper.spawn(argv, stdout=out, stderr=subprocess.STDOUT, env=python_env(self.tmp), cwd=d)
        tls = ["-ca", pki.ca, "-cert", pki.client_cert, "-key", pki.client_key, "-server-name", "localhost"]
        addrs = {UNIX: (str(d / "grpc.sock"), []), TLS: (f"127.0.0.1:{port}", tls)}
        try:
            for t, (addr, extra) in addrs.items():
                try:
                    r = self.client(
                        "grpc-wait", addr, *extra, "-timeout", f"{READY_TIMEOUT_S}s", timeout=READY_TIMEOUT_S + 10
                    )
                except BenchError as e:
                    raise BenchError(f"cdtwist not serving on {t}: {e}{tail(logfile)}") from e
                if proc.poll() is not None:
                    raise BenchError(f"cdtwist exited ({proc.returncode}):{tail(logfile)}")
                log(f"cdtwist serving on {t} {addr} (version {r['version']!r})")
            yield {"proc": proc, "addrs": addrs, "version": r["version"], "port": port}
        finally:
            rc = self.reaper.stop(proc)
            if rc not in (0, None, -signal.SIGTERM):
                log(f"cdtwist exited with {rc}:{tail(logfile)}")

    def grpc(self) -> dict[str, Any]:
        a = self.args
        names = [TLS, UNIX]
        blocks = [a.grpc_calls // a.blocks + (1 if i < a.grpc_calls % a.blocks else 0) for i in range(a.blocks)]
        samples: dict[str, list[int]] = {n: [] for n in names}
        block_p50: dict[str, list[float]] = {n: [] for n in names}
        first: dict[str, list[float]] = {n: [] for n in names}
        with self.daemon() as dm:
            log(f"gRPC Version: {a.grpc_calls} sequential calls per transport, {a.blocks} ABBA blocks")
            for b, n_calls in enumerate(blocks):
                for n in names if b % 2 == 0 else reversed(names):
                    addr, extra = dm["addrs"][n]
                    warm = a.warmup if b == 0 else min(a.warmup, 50)
                    r = self.client(
                        "grpc-latency",
                        addr,
                        *extra,
                        "-n",
                        str(n_calls),
                        "-warmup",
                        str(warm),
                        "-samples",
                        timeout=120 + n_calls / 100,
                    )
                    samples[n].extend(r["samples_ns"])
                    block_p50[n].append(r["stats"]["p50_us"])
                    first[n].append(r["connect_first_call_us"])
            rss = rss_mib(dm["proc"].pid)
            version = dm["version"]
        return {
            "version": version,
            "rss_mib_after": rss,
            **{
                n: {"stats": summarize_us(samples[n]), "block_p50_us": block_p50[n], "connect_first_call_us": first[n]}
                for n in names
            },
        }


CONFIG_TEMPLATE = """\
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{d}/grpc.sock"
  tcp_address = "127.0.0.1:{port}"
  tcp_tls_cert = "{cert}"
  tcp_tls_key = "{key}"
  tcp_tls_ca = "{ca}"

[ttrpc]
  address = "{d}/ttrpc.sock"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"""


def hotspots(raw: str, top: int) -> dict[str, Any]:
    """Where py-spy's raw stacks (``frame;frame;... count``, frames ``func (file:line)``) spend the samples.

    * ``self``: the leaf line (a C call such as a syscall or protobuf
      parsing counts at the Python line that made it);
    * ``cdtwist_line``: the deepest ``cdtwist/`` frame, i.e. the cdtwist line
      responsible, whatever Twisted/protobuf/syscall work runs below it;
      samples without one (reactor, transport I/O) keep their leaf;
    * ``cdtwist_function``: inclusive time per cdtwist function.
    """
    leaf: Counter[str] = Counter()
    owner: Counter[str] = Counter()
    function: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += n
        leaf[frames[-1]] += n
        ours = [f for f in frames if "cdtwist/" in f]
        owner[ours[-1] if ours else f"[no cdtwist frame] {frames[-1]}"] += n
        for f in {f.rsplit(":", 1)[0] + ")" for f in ours}:
            function[f] += n

    def rows(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"frame": f, "samples": k, "pct": 100.0 * k / total} for f, k in c.most_common(top)]

    return {"samples": total, "self": rows(leaf), "cdtwist_line": rows(owner), "cdtwist_function": rows(function)}


# --------------------------------------------------------------------------- report


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(r: tuple[str, ...]) -> str:
        cells = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        return "| " + " | ".join(cells) + " |"

    return [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(fmt(r) for r in rows)]


def report(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines: list[str] = []
    if "ttrpc" in results:
        rows: list[tuple[str, ...]] = []

        def row(label: str, a: float, b: float, fmt: str) -> None:
            rows.append((label, fmt.format(a), fmt.format(b), ratio(a, b)))

        def info(label: str, a: str, b: str) -> None:
            rows.append((label, a, b, "-"))

        for size in (SMALL, BIG):
            r = results["ttrpc"][str(size)]
            py, go = r[PY], r[GO]
            lp, lg = py["latency"]["stats"], go["latency"]["stats"]
            rows.append((f"State, {SIZE_LABEL[size]}", "", "", ""))
            row(f"  latency p50, {lp['n']} sequential (us)", lp["p50_us"], lg["p50_us"], "{:.0f}")
            row("  latency p99 (us)", lp["p99_us"], lg["p99_us"], "{:.0f}")
            row("  latency mean (us)", lp["mean_us"], lg["mean_us"], "{:.0f}")
            info(
                f"  p50 of each of {len(py['latency']['block_p50_us'])} ABBA blocks (us)",
                " ".join(f"{v:.0f}" for v in py["latency"]["block_p50_us"]),
                " ".join(f"{v:.0f}" for v in go["latency"]["block_p50_us"]),
            )
            row(
                "  server CPU per sequential call (us)",
                py["latency"]["server_cpu_us_per_call"],
                go["latency"]["server_cpu_us_per_call"],
                "{:.0f}",
            )
            for conc, conns in LOADS:
                key = f"c{conc}x{conns}"
                tp, tg = py["throughput"][key], go["throughput"][key]
                where = "1 conn" if conns == 1 else f"{conns} conns"
                row(f"  {conc} concurrent, {where} (calls/s)", tp["calls_per_s"], tg["calls_per_s"], "{:.0f}")
                info(
                    "    call p50 / p99 (ms)",
                    f"{tp['p50_us'] / 1e3:.2f} / {tp['p99_us'] / 1e3:.2f}",
                    f"{tg['p50_us'] / 1e3:.2f} / {tg['p99_us'] / 1e3:.2f}",
                )
                row(
                    "    server CPU per call (us)", tp["server_cpu_us_per_call"], tg["server_cpu_us_per_call"], "{:.0f}"
                )
                if tp["errors"] or tg["errors"]:
                    info("    errors", str(tp["errors"]), str(tg["errors"]))
        rss = results["ttrpc"]["rss_mib_after"]
        row("server RSS after the load (MiB)", rss[PY], rss[GO], "{:.1f}")
        lines += ["ttrpc: cdtwist's Python server vs github.com/containerd/ttrpc's, same Go client", ""]
        lines += table(("metric", "cdtwist (py)", "go ttrpc", "py/go"), rows)
        lines += [
            "",
            "ratio > 1: cdtwist slower for us (latency, CPU) and MiB; ratio < 1: cdtwist slower for calls/s.",
            "The Python server is one reactor thread; the Go server may use every core. Client and server share "
            f"the machine's {cfg['cpus']} CPUs. CPU per call = the server process's utime+stime over a block / "
            "calls it served (warm-up included).",
        ]
    if "grpc" in results:
        g = results["grpc"]
        t, u = g[TLS]["stats"], g[UNIX]["stats"]
        rows = [
            (
                f"Version p50, {t['n']} sequential (us)",
                f"{t['p50_us']:.0f}",
                f"{u['p50_us']:.0f}",
                ratio(t["p50_us"], u["p50_us"]),
            ),
            ("Version p99 (us)", f"{t['p99_us']:.0f}", f"{u['p99_us']:.0f}", ratio(t["p99_us"], u["p99_us"])),
            ("Version mean (us)", f"{t['mean_us']:.0f}", f"{u['mean_us']:.0f}", ratio(t["mean_us"], u["mean_us"])),
            (
                f"  p50 of each of {len(g[TLS]['block_p50_us'])} ABBA blocks (us)",
                " ".join(f"{v:.0f}" for v in g[TLS]["block_p50_us"]),
                " ".join(f"{v:.0f}" for v in g[UNIX]["block_p50_us"]),
                "-",
            ),
            (
                "connect (+TLS handshake) + first call, median (ms)",
                f"{statistics.median(g[TLS]['connect_first_call_us']) / 1e3:.2f}",
                f"{statistics.median(g[UNIX]['connect_first_call_us']) / 1e3:.2f}",
                ratio(
                    statistics.median(g[TLS]["connect_first_call_us"]),
                    statistics.median(g[UNIX]["connect_first_call_us"]),
                ),
            ),
        ]
        if lines:
            lines.append("")
        lines += [f"gRPC: cdtwist daemon ({g['version']}), Go grpc-go client, mTLS over TCP 127.0.0.1 vs UNIX", ""]
        lines += table(("metric", "tls-tcp", "unix", "tls/unix"), rows)
        if t["p50_us"] >= NAGLE_HINT_US:
            lines += [
                "",
                f"tls-tcp p50 >= {NAGLE_HINT_US / 1e3:.0f} ms: the signature of Nagle + delayed ACK (~40 ms on Linux), "
                "i.e. the daemon's accepted TCP socket lacks TCP_NODELAY.",
            ]
    prof = results.get("ttrpc", {}).get("profile")
    if prof:
        for size, p in prof.items():
            if not p:
                continue
            lines += [
                "",
                f"py-spy, Python server, State {SIZE_LABEL[int(size)]}, 16 concurrent: top self time "
                f"({p['samples']} samples)",
            ]
            lines += [f"  {e['pct']:5.1f}%  {e['frame']}" for e in p["self"]]
            lines += ["  by the deepest cdtwist line on the stack (its Twisted/protobuf/syscall callees included):"]
            lines += [f"  {e['pct']:5.1f}%  {e['frame']}" for e in p["cdtwist_line"]]
            lines += ["  inclusive per cdtwist function:"]
            lines += [f"  {e['pct']:5.1f}%  {e['frame']}" for e in p["cdtwist_function"]]
    lines += [
        "",
        f"{cfg['cpus']} CPUs; calls={cfg['calls']} grpc_calls={cfg['grpc_calls']} blocks={cfg['blocks']} "
        f"throughput {cfg['tp_blocks']} x {cfg['duration']}s (+{cfg['tp_warmup']}s warm-up) per load; "
        f"loadavg at start {cfg['loadavg_start']}, at end {cfg['loadavg_end']}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short run: 1000 calls, 2 x 0.5 s per load")
    p.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    p.add_argument("--only", choices=["ttrpc", "grpc"], help="run one part only")
    p.add_argument("--calls", type=int, help="sequential ttrpc calls per server and payload (default 5000)")
    p.add_argument("--grpc-calls", type=int, help="sequential gRPC Version calls per transport (default 2000)")
    p.add_argument("--warmup", type=int, default=200, help="unmeasured calls before the first block (default 200)")
    p.add_argument("--blocks", type=int, default=4, help="alternating blocks the sequential calls come in (4)")
    p.add_argument("--duration", type=float, help="seconds per throughput block (default 1.5)")
    p.add_argument("--tp-blocks", type=int, default=2, help="alternating blocks per throughput load (default 2)")
    p.add_argument("--tp-warmup", type=float, default=0.3, help="unmeasured seconds before each throughput block")
    p.add_argument("--profile", action="store_true", help="also py-spy the Python ttrpc server and list hotspots")
    p.add_argument("--profile-seconds", type=float, help="py-spy duration per payload (default 5, --quick 2)")
    p.add_argument("--profile-top", type=int, default=12, help="hotspot lines per list (default 12)")
    p.add_argument("--profile-raw", metavar="PREFIX", help="also keep py-spy's raw stacks as PREFIX-<size>.txt")
    p.add_argument("--keep-tmp", action="store_true", help="leave the temp dir (logs) for inspection")
    a = p.parse_args(argv)
    a.calls = a.calls or (1000 if a.quick else 5000)
    a.grpc_calls = a.grpc_calls or (1000 if a.quick else 2000)
    a.duration = a.duration or (0.5 if a.quick else 1.5)
    a.profile_seconds = a.profile_seconds or (2.0 if a.quick else 5.0)
    if a.quick:
        a.warmup = min(a.warmup, 100)
    a.blocks = max(1, min(a.blocks, a.calls, a.grpc_calls))
    if min(a.calls, a.grpc_calls, a.tp_blocks) < 1 or not 0 < a.duration <= 60 or not 0 <= a.tp_warmup <= 10:
        p.error("--calls, --grpc-calls, --tp-blocks must be >= 1, 0 < --duration <= 60, 0 <= --tp-warmup <= 10")
    if not 0 < a.profile_seconds <= 60:
        p.error("0 < --profile-seconds <= 60")
    return a


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-python"]:
        if len(argv) != 2:
            log("usage: ttrpc_bench.py serve-python SOCK")
            return 2
        return serve_python(argv[1])
    args = parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old_term = signal.signal(signal.SIGTERM, on_term)
    old_hup = signal.signal(signal.SIGHUP, on_term)
    reaper = Reaper()
    # Short: socket paths must stay under 108 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="ttb.", dir="/tmp"))
    try:
        binary = build_go(tmp)
        load_start = loadavg()
        if float(load_start.split()[0]) > 0.5:
            log(f"the machine is busy (loadavg {load_start}): expect noisy numbers, compare ratios")
        log(f"temp dir {tmp}")
        bench = Bench(args, tmp, reaper, binary)
        results: dict[str, Any] = {
            "config": {
                "calls": args.calls,
                "grpc_calls": args.grpc_calls,
                "warmup": args.warmup,
                "blocks": args.blocks,
                "duration": args.duration,
                "tp_blocks": args.tp_blocks,
                "tp_warmup": args.tp_warmup,
                "loads": [{"concurrency": c, "conns": n} for c, n in LOADS],
                "sizes": [SMALL, BIG],
                "cpus": os.cpu_count(),
                "loadavg_start": load_start,
                "loadavg_end": "",
            },
        }
        if args.only in (None, "ttrpc"):
            results["ttrpc"] = bench.ttrpc()
        if args.only in (None, "grpc"):
            results["grpc"] = bench.grpc()
        results["config"]["loadavg_end"] = loadavg()
        print(report(results), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
            log(f"wrote {args.json}")
        return 0
    except BenchError as e:
        log(f"error: {e}")
        return 2
    except (KeyboardInterrupt, Interrupted) as e:
        log(f"interrupted ({str(e) or 'SIGINT'}), cleaning up")
        return 130
    finally:
        # Ignore further Ctrl-C while cleaning up, so nothing is left behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        reaper.stop_all()
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGHUP, old_hup)


if __name__ == "__main__":
    sys.exit(main())
