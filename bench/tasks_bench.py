"""Containers through runtime v2 shims: cdtwist vs containerd 1.6.20 side by side, one table.

    sudo python3 bench/tasks_bench.py              # 20 runs, 20 concurrent containers
    sudo python3 bench/tasks_bench.py --runs 40 --concurrent 30 --bulk-rounds 5

Rows (each for both daemons, plus the ratio cdtwist/containerd):

- ``ctr run --rm IMG id /bin/true``: wall time of the whole ``ctr`` command (container, snapshot,
  shim start, task create/start/wait/delete, container delete), median and p90 of ``--runs``,
  alternating between the daemons run by run so background load drifts hit both.
- ``--concurrent`` x ``ctr run -d`` started at once, then all killed (SIGKILL) and removed
  (``ctr task rm`` + ``ctr c rm``, also concurrent): wall time of each phase and in total, the
  median of ``--bulk-rounds`` rounds, alternating which daemon goes first round by round.

The image is the integration tests' busybox image (built from ``busybox-static``, imported with
``ctr images import``).  Daemons run on their own temp dirs (tests/integration/harness.py); the
target is cdtwist <= 1.2x containerd.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.integration.harness import CdtwistDaemon, ContainerdDaemon, DaemonProcess  # noqa: E402
from tests.integration.test_tasks_ctr import IMAGE, image_tar  # noqa: E402

NS = "bench"


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def run_rm(d: DaemonProcess, id: str) -> float:
    started = time.monotonic()
    d.ctr("run", "--rm", IMAGE, id, "/bin/true", namespace=NS).ok()
    return time.monotonic() - started


def concurrent(d: DaemonProcess, n: int, tag: str) -> tuple[float, float]:
    ids = [f"{tag}-{i}" for i in range(n)]
    with ThreadPoolExecutor(n) as pool:
        started = time.monotonic()
        list(pool.map(lambda id: d.ctr("run", "-d", IMAGE, id, "sleep", "1000", namespace=NS).ok(), ids))
        up = time.monotonic() - started

        def stop(id: str) -> None:
            d.ctr("task", "kill", "-s", "SIGKILL", id, namespace=NS).ok()
            for _ in range(200):
                if d.ctr("task", "rm", id, namespace=NS).rc == 0:
                    break
                time.sleep(0.02)
            d.ctr("c", "rm", id, namespace=NS).ok()

        started = time.monotonic()
        list(pool.map(stop, ids))
        down = time.monotonic() - started
    return up, down


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=20)
    parser.add_argument("--bulk-rounds", type=int, default=3, help="rounds of the concurrent phase (median)")
    args = parser.parse_args()

    load_start = os.getloadavg()[0]
    daemons: dict[str, DaemonProcess] = {"containerd": ContainerdDaemon(None), "cdtwist": CdtwistDaemon(None)}
    try:
        for d in daemons.values():
            d.start()
            d.ctr("images", "import", image_tar(), namespace=NS, timeout=120).ok()
            run_rm(d, "warmup")  # first shim start, page cache
        latencies: dict[str, list[float]] = {name: [] for name in daemons}
        for i in range(args.runs):
            order = list(daemons.items()) if i % 2 == 0 else list(reversed(daemons.items()))
            for name, d in order:
                latencies[name].append(run_rm(d, f"r{i}"))
        rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in daemons}
        for r in range(args.bulk_rounds):
            order = list(daemons.items()) if r % 2 == 0 else list(reversed(daemons.items()))
            for name, d in order:
                rounds[name].append(concurrent(d, args.concurrent, f"c{r}"))
        bulk = {
            name: (
                statistics.median([u for u, _ in v]),
                statistics.median([k for _, k in v]),
                statistics.median([u + k for u, k in v]),
            )
            for name, v in rounds.items()
        }
    finally:
        for d in daemons.values():
            d.cleanup(check=False)
        try:  # runc's state dir for the namespace (neither daemon removes it)
            os.rmdir(os.path.join("/run/containerd/runc", NS))
        except OSError:
            pass

    rows = [
        ("ctr run --rm: median (ms)", {n: statistics.median(v) * 1000 for n, v in latencies.items()}),
        ("ctr run --rm: p90 (ms)", {n: p90(v) * 1000 for n, v in latencies.items()}),
        (f"{args.concurrent} x run -d, all up (ms)", {n: b[0] * 1000 for n, b in bulk.items()}),
        (f"{args.concurrent} x kill + rm (ms)", {n: b[1] * 1000 for n, b in bulk.items()}),
        (f"{args.concurrent} x total (ms)", {n: b[2] * 1000 for n, b in bulk.items()}),
    ]
    worst = 0.0
    print(f"{'':36} {'containerd':>12} {'cdtwist':>12} {'ratio':>8}")
    for label, values in rows:
        ratio = values["cdtwist"] / values["containerd"]
        worst = max(worst, ratio)
        print(f"{label:36} {values['containerd']:12.1f} {values['cdtwist']:12.1f} {ratio:8.2f}")
    verdict = "PASS" if worst <= 1.2 else "FAIL"
    print(
        f"target cdtwist <= 1.2x containerd: {verdict} (worst ratio {worst:.2f}; "
        f"loadavg {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end)"
    )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
