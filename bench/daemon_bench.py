#!/usr/bin/env python3
"""Benchmark cdtwist against containerd 1.6.20, side by side, in one run.

Both daemons get the same config shape on private temp dirs under a short
``/tmp`` path (never ``/run/containerd`` or ``/var/lib/containerd``) and are
measured one at a time, so they never compete for the machine's cores:

* spawn -> serving: from ``Popen`` to the first successful ``Version`` RPC,
  polled every millisecond; the median of ``--spawns`` fresh spawns each,
  alternating between the daemons;
* RSS (``VmRSS`` of the daemon process, the python process for twistd)
  after boot and after the load runs, plus the peak (``VmHWM``);
* sequential ``Version`` latency p50/p99 over ``--calls`` calls;
* ``namespaces.List`` calls/s from 16 and 64 concurrent streams over one
  connection for ``--duration`` seconds each.

The load client is ``bench/goclient`` (grpc-go and containerd's own API
package, built from /usr/share/gocode in GOPATH mode into the temp dir); a
grpcio client is the fallback only when that build fails, and the output
says so.  Every loop is bounded; every daemon, client and temp dir is
removed on exit, Ctrl-C and SIGTERM included.

    python3 bench/daemon_bench.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

GOCLIENT_SRC = REPO / "bench" / "goclient" / "main.go"
CONTAINERD = "/usr/bin/containerd"

TARGET_SERVING_S = 1.0
TARGET_RSS_MIB = 80.0
TARGET_P50_RATIO = 2.0

READY_TIMEOUT_S = 15.0


# --------------------------------------------------------------------------- processes


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM in KiB and Threads from /proc/<pid>/status."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    return out


def mib(kib: int) -> float:
    return kib / 1024.0


# --------------------------------------------------------------------------- clients


class Client:
    """The load client's three operations; each returns the goclient's JSON shape."""

    name = "?"
    note = ""

    def wait(self, sock: str, timeout: float) -> dict[str, Any]:
        raise NotImplementedError

    def latency(self, sock: str, n: int, warmup: int) -> dict[str, Any]:
        raise NotImplementedError

    def throughput(self, sock: str, concurrency: int, duration: float) -> dict[str, Any]:
        raise NotImplementedError


class GoClient(Client):
    name = "go (grpc-go + containerd api)"

    def __init__(self, binary: Path) -> None:
        self.binary = str(binary)

    def wait(self, sock: str, timeout: float) -> dict[str, Any]:
        return run_json(
            [self.binary, "wait", "-addr", sock, "-timeout", f"{timeout}s", "-interval", "1ms"], timeout + 5
        )

    def latency(self, sock: str, n: int, warmup: int) -> dict[str, Any]:
        argv = [self.binary, "latency", "-addr", sock, "-n", str(n), "-warmup", str(warmup), "-samples"]
        return run_json(argv, 120 + n / 100)

    def throughput(self, sock: str, concurrency: int, duration: float) -> dict[str, Any]:
        argv = [self.binary, "throughput", "-addr", sock, "-c", str(concurrency), "-d", f"{duration}s"]
        return run_json(argv, duration + 60)


class PythonClient(Client):
    """grpcio fallback: slower than the daemons it measures, so only a fallback."""

    name = "python grpcio (FALLBACK: slower than grpc-go, may be the bottleneck)"

    def __init__(self) -> None:
        sys.path.insert(0, str(REPO))
        import grpc
        from google.protobuf import empty_pb2

        from cdtwist.api.services.namespaces.v1 import namespace_pb2, namespace_pb2_grpc
        from cdtwist.api.services.version.v1 import version_pb2_grpc

        self.grpc = grpc
        self.empty = empty_pb2.Empty
        self.list_req = namespace_pb2.ListNamespacesRequest
        self.version_stub = version_pb2_grpc.VersionStub
        self.ns_stub = namespace_pb2_grpc.NamespacesStub

    def _channel(self, sock: str) -> Any:
        return self.grpc.insecure_channel(
            "unix:" + sock, options=[("grpc.initial_reconnect_backoff_ms", 1), ("grpc.max_reconnect_backoff_ms", 50)]
        )

    def wait(self, sock: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        attempts = 0
        last: Exception | None = None
        while time.monotonic() < deadline:
            attempts += 1
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(sock)
                with self._channel(sock) as ch:
                    resp = self.version_stub(ch).Version(self.empty(), timeout=2.0)
                return {"ready_mono_ns": time.monotonic_ns(), "attempts": attempts, "version": resp.version}
            except (OSError, self.grpc.RpcError) as e:
                last = e
                time.sleep(0.001)
        raise BenchError(f"not serving after {timeout}s ({attempts} attempts): {last}")

    def latency(self, sock: str, n: int, warmup: int) -> dict[str, Any]:
        with self._channel(sock) as ch:
            stub = self.version_stub(ch)
            for _ in range(warmup):
                stub.Version(self.empty(), timeout=5.0)
            samples: list[int] = []
            start = time.monotonic_ns()
            for _ in range(n):
                t0 = time.perf_counter_ns()
                stub.Version(self.empty(), timeout=5.0)
                samples.append(time.perf_counter_ns() - t0)
            wall = (time.monotonic_ns() - start) / 1e9
        return {"rpc": "Version", "stats": summarize_us(samples), "wall_s": wall, "samples_ns": samples}

    def throughput(self, sock: str, concurrency: int, duration: float) -> dict[str, Any]:
        with self._channel(sock) as ch:
            stub = self.ns_stub(ch)
            lock = threading.Lock()
            samples: list[int] = []
            errors: list[str] = []

            def worker(deadline: float) -> None:
                mine: list[int] = []
                while time.monotonic() < deadline:
                    t0 = time.perf_counter_ns()
                    try:
                        stub.List(self.list_req(), timeout=5.0)
                    except self.grpc.RpcError as e:
                        errors.append(str(e))
                        continue
                    mine.append(time.perf_counter_ns() - t0)
                with lock:
                    samples.extend(mine)

            start = time.monotonic()
            threads = [threading.Thread(target=worker, args=(start + duration,)) for _ in range(concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(duration + 30)
            wall = time.monotonic() - start
        return {
            "rpc": "namespaces.List", "concurrency": concurrency, "conns": 1, "ok": len(samples),
            "errors": len(errors), "first_error": errors[0] if errors else "", "wall_s": wall,
            "calls_per_s": len(samples) / wall, "stats": summarize_us(samples),
        }


def build_goclient(tmp: Path) -> tuple[Client, str]:
    """``go build`` bench/goclient in GOPATH mode into the temp dir; the grpcio client if that fails."""
    try:
        binary = go_build(tmp, GOCLIENT_SRC, "goclient", ("google.golang.org/grpc",), timeout=300)
    except BenchError as e:
        return PythonClient(), str(e)
    return GoClient(binary), ""


# --------------------------------------------------------------------------- daemons


CONFIG_TEMPLATE = """\
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{d}/grpc.sock"

[ttrpc]
  address = "{d}/ttrpc.sock"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"""


@dataclass
class Daemon:
    name: str
    argv: Callable[[Path], list[str]]
    env: dict[str, str] = field(default_factory=dict)


def daemons(tmp: Path, bytecode_cache: bool) -> list[Daemon]:
    py_path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {"PYTHONPATH": py_path}
    if bytecode_cache:
        # An installed cdtwist has its .pyc files; a source tree run with
        # PYTHONDONTWRITEBYTECODE=1 (as in this sandbox) recompiles every
        # module on every start.  Cache bytecode in the temp dir instead of
        # writing __pycache__ into the work tree ("" turns the variable off).
        env |= {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(tmp / "pycache")}
    cdtwist = Daemon(
        "cdtwist",
        lambda cfg: [sys.executable, "-c", TWISTD_BOOTSTRAP, "-n", "--pidfile=", "cdtwist", "-c", str(cfg)],
        env,
    )
    containerd = Daemon("containerd", lambda cfg: [CONTAINERD, "-c", str(cfg)])
    return [cdtwist, containerd]


@dataclass
class Instance:
    daemon: Daemon
    dir: Path
    proc: subprocess.Popen[bytes]
    spawn_ns: int
    logfile: Path
    ready_s: float = 0.0
    ready_cpu_s: float = 0.0
    version: str = ""

    @property
    def sock(self) -> str:
        return str(self.dir / "grpc.sock")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path, reaper: Reaper, client: Client) -> None:
        self.args = args
        self.tmp = tmp
        self.reaper = reaper
        self.client = client
        self.counter = 0

    @contextmanager
    def running(self, daemon: Daemon) -> Iterator[Instance]:
        """Spawn ``daemon`` on fresh dirs, wait until it serves, stop it afterwards."""
        self.counter += 1
        d = self.tmp / f"{daemon.name[:2]}{self.counter}"
        d.mkdir()
        cfg = d / "config.toml"
        cfg.write_text(CONFIG_TEMPLATE.format(d=d))
        logfile = d / "daemon.log"
        env = dict(os.environ, **daemon.env)
        with open(logfile, "wb") as out:
            spawn_ns = time.monotonic_ns()
            proc = self.reaper.spawn(daemon.argv(cfg), stdout=out, stderr=subprocess.STDOUT, env=env, cwd=d)
        inst = Instance(daemon, d, proc, spawn_ns, logfile)
        try:
            try:
                ready = self.client.wait(inst.sock, READY_TIMEOUT_S)
            except BenchError as e:
                raise BenchError(f"{daemon.name} did not serve: {e}\n--- {logfile}:\n{inst.log_tail()}") from e
            if proc.poll() is not None:
                raise BenchError(f"{daemon.name} exited ({proc.returncode}):\n{inst.log_tail()}")
            inst.ready_s = (ready["ready_mono_ns"] - spawn_ns) / 1e9
            inst.ready_cpu_s = cpu_seconds(proc.pid)
            inst.version = str(ready.get("version", "?"))
            yield inst
        finally:
            rc = self.reaper.stop(proc)
            if rc not in (0, None, -signal.SIGTERM):
                log(f"{daemon.name} exited with {rc}")
            umount_under(d)
            if not self.args.keep_tmp:
                shutil.rmtree(d, ignore_errors=True)

    def spawn_times(self, ds: list[Daemon]) -> dict[str, dict[str, list[float]]]:
        """Wall and CPU seconds from spawn to serving, after one untimed warm-up spawn each.

        The warm-up fills the page cache and (for cdtwist) the bytecode cache,
        so every timed spawn starts from the same state an installed daemon
        restarting on a live machine would.
        """
        times: dict[str, dict[str, list[float]]] = {d.name: {"wall": [], "cpu": []} for d in ds}
        for daemon in ds:
            with self.running(daemon) as inst:
                log(f"warm-up spawn {daemon.name}: serving after {inst.ready_s * 1e3:.0f} ms (not counted)")
        for i in range(self.args.spawns):
            for daemon in ds if i % 2 == 0 else reversed(ds):
                with self.running(daemon) as inst:
                    times[daemon.name]["wall"].append(inst.ready_s)
                    times[daemon.name]["cpu"].append(inst.ready_cpu_s)
                log(
                    f"spawn {i + 1}/{self.args.spawns} {daemon.name}: serving after {inst.ready_s * 1e3:.0f} ms"
                    f" ({inst.ready_cpu_s * 1e3:.0f} ms CPU)"
                )
        return times

    def load(self, ds: list[Daemon]) -> dict[str, dict[str, Any]]:
        """One fresh instance of each daemon, both up, measured in alternating turns.

        Only one daemon is under load at a time, the other idles.  Alternating
        (ABBA) blocks spread any drift in the machine's background load over
        both daemons instead of charging it to whichever ran second.
        """
        a = self.args
        out: dict[str, dict[str, Any]] = {d.name: {"throughput": {}} for d in ds}
        with ExitStack() as stack:
            insts = {d.name: stack.enter_context(self.running(d)) for d in ds}
            time.sleep(a.settle)
            for name, inst in insts.items():
                out[name]["version"] = inst.version
                out[name]["load_instance_serving_s"] = inst.ready_s
                out[name]["status_boot"] = proc_status(inst.proc.pid)
                log(f"{name}: RSS after boot {mib(out[name]['status_boot']['VmRSS']):.1f} MiB")
            samples: dict[str, list[int]] = {d.name: [] for d in ds}
            block_p50: dict[str, list[float]] = {d.name: [] for d in ds}
            block_cpu: dict[str, list[float]] = {d.name: [] for d in ds}
            sizes = [a.calls // a.blocks + (1 if i < a.calls % a.blocks else 0) for i in range(a.blocks)]
            log(f"Version x{a.calls} each, in {a.blocks} alternating blocks")
            for b, n in enumerate(sizes):
                for d in ds if b % 2 == 0 else reversed(ds):
                    warmup = a.warmup if b == 0 else min(a.warmup, 50)
                    pid = insts[d.name].proc.pid
                    cpu0 = cpu_seconds(pid)
                    r = self.client.latency(insts[d.name].sock, n, warmup)
                    # Every call of the block, warm-up included, was served in this window.
                    block_cpu[d.name].append((cpu_seconds(pid) - cpu0, n + warmup))
                    samples[d.name].extend(r["samples_ns"])
                    block_p50[d.name].append(r["stats"]["p50_us"])
            for name, inst in insts.items():
                out[name]["latency"] = {
                    "rpc": "Version", "blocks": a.blocks, "block_p50_us": block_p50[name],
                    # /proc CPU times tick every 10 ms: only the sum over the blocks is precise.
                    "cpu_us_per_call": sum(c for c, _ in block_cpu[name]) / sum(k for _, k in block_cpu[name]) * 1e6,
                    "stats": summarize_us(samples[name]),
                }
                out[name]["status_after_latency"] = proc_status(inst.proc.pid)
            for i, c in enumerate(a.concurrency):
                for d in ds if i % 2 == 0 else reversed(ds):
                    log(f"{d.name}: namespaces.List, {c} streams, {a.duration}s")
                    out[d.name]["throughput"][str(c)] = self.client.throughput(insts[d.name].sock, c, a.duration)
            for name, inst in insts.items():
                out[name]["status_after_load"] = proc_status(inst.proc.pid)
        return out


def umount_under(d: Path) -> None:
    """Lazily unmount anything a daemon left mounted below its temp dir."""
    prefix = str(d) + "/"
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
    except OSError:
        return
    for mp in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True, timeout=10, check=False)


# --------------------------------------------------------------------------- report


def ratio(a: float, b: float) -> str:
    if not b:
        return "-"
    return f"{a / b:.2f}x"


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def report(results: dict[str, Any]) -> str:
    cd, ct = results["daemons"]["cdtwist"], results["daemons"]["containerd"]
    rows: list[tuple[str, ...]] = []

    def row(label: str, a: float, b: float, fmt: str, target: str = "-", ok: bool | None = None) -> None:
        rows.append((label, fmt.format(a), fmt.format(b), ratio(a, b), target, verdict(ok)))

    def info(label: str, a: str, b: str) -> None:
        rows.append((label, a, b, "-", "-", "-"))

    def span(v: list[float]) -> str:
        return f"{min(v) * 1e3:.0f} / {max(v) * 1e3:.0f}"

    sa, sb = cd["serving_median_s"], ct["serving_median_s"]
    row(f"spawn->serving, median of {len(cd['serving_s'])} (ms)", sa * 1e3, sb * 1e3, "{:.0f}",
        f"<= {TARGET_SERVING_S * 1e3:.0f} ms", sa <= TARGET_SERVING_S)
    info("  min / max (ms)", span(cd["serving_s"]), span(ct["serving_s"]))
    row("  CPU used to serving, median (ms)", cd["serving_cpu_median_s"] * 1e3, ct["serving_cpu_median_s"] * 1e3,
        "{:.0f}")
    for key, label in (("status_boot", "RSS after boot (MiB)"), ("status_after_latency", "RSS after latency run (MiB)"),
                       ("status_after_load", "RSS after all load (MiB)")):
        a, b = mib(cd[key]["VmRSS"]), mib(ct[key]["VmRSS"])
        row(label, a, b, "{:.1f}", f"<= {TARGET_RSS_MIB:.0f} MiB", a <= TARGET_RSS_MIB)
    row("peak RSS, VmHWM (MiB)", mib(cd["status_after_load"]["VmHWM"]), mib(ct["status_after_load"]["VmHWM"]),
        "{:.1f}")
    row("threads after load", cd["status_after_load"]["Threads"], ct["status_after_load"]["Threads"], "{:.0f}")
    la, lb = cd["latency"]["stats"], ct["latency"]["stats"]
    row(f"Version p50, {la['n']} sequential (us)", la["p50_us"], lb["p50_us"], "{:.0f}")
    blocks = results["config"]["blocks"]
    if blocks > 1:

        def per_block(r: dict[str, Any]) -> str:
            return " ".join(f"{v:.0f}" for v in r["latency"]["block_p50_us"])

        info(f"  p50 of each of {blocks} ABBA blocks (us)", per_block(cd), per_block(ct))
    ratios = block_ratios(results)
    rows.append((
        f"  Version p50 ratio, median of {len(ratios)} block pairs", "-", "-", f"{statistics.median(ratios):.2f}x",
        f"<= {TARGET_P50_RATIO:.0f}x containerd", verdict(p50_ratio(results) <= TARGET_P50_RATIO),
    ))
    if len(ratios) > 1:
        spread = f"{min(ratios):.2f}x / {max(ratios):.2f}x"
        rows.append(("    min / max of the block-pair ratios", "-", "-", spread, "-", "-"))
    row("Version p99 (us)", la["p99_us"], lb["p99_us"], "{:.0f}")
    if "cpu_us_per_call" in cd["latency"]:
        row("Version: daemon CPU per call (us)", cd["latency"]["cpu_us_per_call"], ct["latency"]["cpu_us_per_call"],
            "{:.0f}")
    row("Version mean (us)", la["mean_us"], lb["mean_us"], "{:.0f}")
    for c in results["config"]["concurrency"]:
        ta, tb = cd["throughput"][str(c)], ct["throughput"][str(c)]
        row(f"namespaces.List, {c} streams (calls/s)", ta["calls_per_s"], tb["calls_per_s"], "{:.0f}")

        def lat(t: dict[str, Any]) -> str:
            return f"{t['stats']['p50_us'] / 1e3:.2f} / {t['stats']['p99_us'] / 1e3:.2f}"

        info(f"  {c} streams: call p50 / p99 (ms)", lat(ta), lat(tb))
        if ta["errors"] or tb["errors"]:
            info(f"  {c} streams: errors", str(ta["errors"]), str(tb["errors"]))

    head = ("metric", "cdtwist", "containerd", "cdtwist/ctrd", "target (cdtwist)", "result")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(r: tuple[str, ...]) -> str:
        cells = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        return "| " + " | ".join(cells) + " |"

    lines = [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(fmt(r) for r in rows)]
    cfg = results["config"]
    lines += [
        "",
        f"client: {results['client']}" + (f" ({results['client_note']})" if results["client_note"] else ""),
        f"versions: cdtwist {cd['version']!r}, containerd {ct['version']!r}; {cfg['cpus']} CPUs; "
        f"spawns={cfg['spawns']} calls={cfg['calls']} duration={cfg['duration']}s settle={cfg['settle']}s; "
        f"loadavg at start {cfg['loadavg_start']}, at end {cfg['loadavg_end']}; cdtwist bytecode cache "
        + ("on (in the temp dir)" if cfg["bytecode_cache"] else "as the environment has it"),
        "ratio > 1 means cdtwist is bigger/slower for ms, MiB, us; smaller/slower for calls/s.",
    ]
    return "\n".join(lines)


def block_ratios(results: dict[str, Any]) -> list[float]:
    """cdtwist/containerd p50 of each block pair: the two blocks run back to back (ABBA order)."""
    cd, ct = results["daemons"]["cdtwist"], results["daemons"]["containerd"]
    pairs = zip(cd["latency"]["block_p50_us"], ct["latency"]["block_p50_us"], strict=True)
    return [a / b for a, b in pairs if b > 0]


def p50_ratio(results: dict[str, Any]) -> float:
    """The Version p50 target's statistic: the median over the block pairs of cdtwist/containerd.

    Each pair is measured within a fraction of a second, so a burst of
    background load hits both halves of a pair or neither; the median then
    ignores the few pairs a burst split.  Pooled p50s are in the table too.
    """
    ratios = block_ratios(results)
    return statistics.median(ratios) if ratios else float("inf")


def summary_targets(results: dict[str, Any]) -> list[str]:
    cd = results["daemons"]["cdtwist"]
    failed = []
    if cd["serving_median_s"] > TARGET_SERVING_S:
        failed.append("serving")
    if max(mib(cd[k]["VmRSS"]) for k in ("status_boot", "status_after_latency", "status_after_load")) > TARGET_RSS_MIB:
        failed.append("rss")
    if p50_ratio(results) > TARGET_P50_RATIO:
        failed.append("p50")
    return failed


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short run: 2 spawns, 500 calls, 1 s per load step")
    p.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    p.add_argument("--spawns", type=int, help="spawns per daemon for the serving time (default 5)")
    p.add_argument("--calls", type=int, help="sequential Version calls (default 2000)")
    p.add_argument("--warmup", type=int, default=200, help="unmeasured Version calls first (default 200)")
    p.add_argument("--blocks", type=int, default=10, help="alternating blocks the Version calls come in (default 10)")
    p.add_argument("--duration", type=float, help="seconds per concurrency level (default 5)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64], help="stream counts (default 16 64)")
    p.add_argument("--settle", type=float, default=0.5, help="seconds between serving and the boot RSS sample")
    p.add_argument("--no-bytecode-cache", action="store_true",
                   help="run cdtwist with the caller's PYTHONDONTWRITEBYTECODE/PYTHONPYCACHEPREFIX as they are")
    p.add_argument("--python-client", action="store_true", help="use the grpcio client even if go builds")
    p.add_argument("--keep-tmp", action="store_true", help="leave the temp dir (daemon logs) for inspection")
    a = p.parse_args(argv)
    a.spawns = a.spawns or (2 if a.quick else 5)
    a.calls = a.calls or (500 if a.quick else 2000)
    a.duration = a.duration or (1.0 if a.quick else 5.0)
    if a.quick:
        a.warmup = min(a.warmup, 100)
    a.blocks = max(1, min(a.blocks, a.calls))
    if min(a.spawns, a.calls, *a.concurrency) < 1 or a.duration <= 0 or a.duration > 120:
        p.error("--spawns, --calls and --concurrency must be >= 1 and 0 < --duration <= 120")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.access(CONTAINERD, os.X_OK):
        log(f"{CONTAINERD} not found")
        return 2
    if os.geteuid() != 0:
        log("containerd needs root (it mounts and chowns under its root dir); run as root")
        return 2

    def on_term(signum: int, frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    old_term = signal.signal(signal.SIGTERM, on_term)
    old_hup = signal.signal(signal.SIGHUP, on_term)
    reaper = Reaper()
    # Short: socket paths must stay under 108 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="cdb.", dir="/tmp"))
    try:
        if args.python_client:
            client: Client = PythonClient()
            note = "--python-client given"
        else:
            client, note = build_goclient(tmp)
            if note:
                log(f"FALLING BACK to the python grpcio client: {note}")
        load_start = loadavg()
        if float(load_start.split()[0]) > 0.5:
            log(f"the machine is busy (loadavg {load_start}): expect noisy numbers")
        bench = Bench(args, tmp, reaper, client)
        ds = daemons(tmp, not args.no_bytecode_cache)
        log(f"client: {client.name}; temp dir {tmp}")
        spawns = bench.spawn_times(ds)
        results: dict[str, Any] = {
            "client": client.name,
            "client_note": note,
            "config": {
                "spawns": args.spawns, "calls": args.calls, "warmup": args.warmup, "duration": args.duration,
                "concurrency": args.concurrency, "settle": args.settle, "cpus": os.cpu_count(),
                "blocks": args.blocks, "loadavg_start": load_start, "loadavg_end": "",
                "bytecode_cache": not args.no_bytecode_cache,
            },
            "targets": {"serving_s": TARGET_SERVING_S, "rss_mib": TARGET_RSS_MIB, "p50_ratio": TARGET_P50_RATIO},
            "daemons": {},
        }
        results["daemons"] = bench.load(ds)
        for daemon in ds:
            r = results["daemons"][daemon.name]
            r["serving_s"] = spawns[daemon.name]["wall"]
            r["serving_cpu_s"] = spawns[daemon.name]["cpu"]
            r["serving_median_s"] = statistics.median(spawns[daemon.name]["wall"])
            r["serving_cpu_median_s"] = statistics.median(spawns[daemon.name]["cpu"])
        results["config"]["loadavg_end"] = loadavg()
        results["p50_ratio_block_median"] = p50_ratio(results)
        failed = summary_targets(results)
        results["failed_targets"] = failed
        print(report(results))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
            log(f"wrote {args.json}")
        return 1 if failed else 0
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
        umount_under(tmp)
        if args.keep_tmp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGHUP, old_hup)


if __name__ == "__main__":
    sys.exit(main())
