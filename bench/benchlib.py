"""What the benches share: child processes stopped on every exit path, Go builds, /proc readings.

Imported by ``bench/daemon_bench.py`` and ``bench/ttrpc_bench.py`` (run as
scripts, so ``bench/`` is on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GO_SYSTEM_PATH = "/usr/share/gocode"
#: ``python -m twisted.scripts.twistd`` does nothing (no ``__main__`` guard): run its entry point.
TWISTD_BOOTSTRAP = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
STOP_GRACE_S = 5.0


class BenchError(RuntimeError):
    pass


class Interrupted(BaseException):  # noqa: N818 - raised by a signal, like KeyboardInterrupt
    pass


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class Reaper:
    """Every process a bench starts, so any exit path can stop them all."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        # A session of its own: a terminal's Ctrl-C reaches only the bench,
        # which then stops the child gracefully (and by its process group).
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = STOP_GRACE_S) -> int | None:
        if proc.stdin is not None:  # children given a pipe exit when it closes
            try:
                proc.stdin.close()
                proc.wait(min(grace, 2.0))
            except (OSError, subprocess.TimeoutExpired):
                pass
        if proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"pid {proc.pid} ignored SIGTERM for {grace}s, killing")
                self._signal(proc, signal.SIGKILL)
                proc.wait(grace)
        self._signal(proc, signal.SIGKILL)  # anything left in its group (containerd would leave shims)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        try:
            os.killpg(proc.pid, sig)  # the group this Popen created, by its id
        except (ProcessLookupError, PermissionError):
            pass

    def stop_all(self) -> None:
        for proc in list(self.procs):
            try:
                self.stop(proc, grace=2.0)
            except Exception as e:  # keep cleaning up the rest
                log(f"stopping pid {proc.pid}: {e}")


def run_json(argv: list[str], timeout: float) -> dict[str, Any]:
    """Run a client to completion (bounded) and parse its one JSON line."""
    try:
        cp = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{' '.join(argv[1:3])} timed out after {timeout:.0f}s") from e
    if cp.returncode != 0:
        raise BenchError(f"{' '.join(argv[1:3])} failed: {cp.stderr.decode(errors='replace').strip()[-800:]}")
    return json.loads(cp.stdout.decode().strip().splitlines()[-1])


def go_build(tmp: Path, source: Path, package: str, needs: tuple[str, ...], timeout: float) -> Path:
    """``go build`` one ``main.go`` in GOPATH mode against Debian's sources into ``tmp``; BenchError if it can't."""
    go = shutil.which("go")
    if go is None:
        raise BenchError("go not found")
    for pkg in needs:
        if not (Path(GO_SYSTEM_PATH) / "src" / pkg).is_dir():
            raise BenchError(f"{GO_SYSTEM_PATH} has no {pkg}")
    gopath = tmp / "gopath"
    src = gopath / "src" / "cdtwistbench" / package
    src.mkdir(parents=True)
    shutil.copy(source, src / "main.go")
    binary = tmp / package
    env = dict(os.environ, GO111MODULE="off", GOPATH=f"{gopath}:{GO_SYSTEM_PATH}", GOFLAGS="", CGO_ENABLED="0")
    t0 = time.monotonic()
    try:
        cp = subprocess.run(
            [go, "build", "-o", str(binary), "."],
            cwd=src,
            env=env,
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError("go build timed out") from e
    if cp.returncode != 0:
        raise BenchError("go build failed: " + cp.stderr.decode(errors="replace").strip()[-800:])
    log(f"built {source.parent.relative_to(REPO)} in {time.monotonic() - t0:.1f}s")
    return binary


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def summarize_us(samples_ns: list[int]) -> dict[str, float]:
    """Percentiles in µs by the Go clients' rule (index ``p*n`` rounded)."""
    s = sorted(samples_ns)
    if not s:
        return {"n": 0}

    def pct(p: float) -> float:
        return s[min(len(s) - 1, int(p * len(s) + 0.5))] / 1e3

    return {
        "n": len(s),
        "min_us": s[0] / 1e3,
        "p50_us": pct(0.50),
        "p90_us": pct(0.90),
        "p99_us": pct(0.99),
        "max_us": s[-1] / 1e3,
        "mean_us": statistics.fmean(s) / 1e3,
    }
