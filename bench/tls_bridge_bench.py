"""Cost of serving gRPC through the Twisted TLS bridge.

Sequential Version calls (one channel, after warm-up) against the same
grpcio server reached three ways:

* ``unix``: plaintext on its UNIX socket (what the bridge forwards to);
* ``grpc-tls``: grpcio's own mTLS TCP port (containerd's tcp_tls_* way);
* ``bridge``: ``cdtls:`` mTLS on 127.0.0.1 terminated by Twisted, bridged to
  the UNIX socket.

Client, grpcio server and reactor share one process (and the GIL), as the
daemon's grpcio server and reactor do.  Usage::

    python3 bench/tls_bridge_bench.py [--calls 1000] [--big 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402
from twisted.internet import reactor  # noqa: E402
from twisted.internet.defer import ensureDeferred  # noqa: E402
from twisted.internet.threads import deferToThread  # noqa: E402

from cdtwist.api.services.version.v1 import version_pb2_grpc  # noqa: E402
from cdtwist.bridge import BridgeService  # noqa: E402
from cdtwist.tls import tls_server_description  # noqa: E402
from tests.support_tls import (  # noqa: E402
    CHANNEL_OPTIONS,
    PKI,
    VersionServicer,
    call_version,
    make_pki,
    rmtree,
    short_tempdir,
    start_unix_grpc,
    tls_channel,
)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def measure(channel: grpc.Channel, calls: int, warmup: int = 100) -> list[float]:
    for _ in range(warmup):
        call_version(channel)
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        call_version(channel)
        samples.append(time.perf_counter() - t0)
    return samples


def run(pki: PKI, servicer: VersionServicer, unix: str, grpc_tls: str, bridge: str, calls: int, big: int) -> None:
    ca, cert, key = pki.read(pki.ca), pki.read(pki.client_cert), pki.read(pki.client_key)
    channels: dict[str, Callable[[], grpc.Channel]] = {
        "unix": lambda: grpc.insecure_channel("unix:" + unix, options=CHANNEL_OPTIONS),
        "grpc-tls": lambda: tls_channel(grpc_tls, ca, cert, key),
        "bridge": lambda: tls_channel(bridge, ca, cert, key),
    }
    print(f"{calls} sequential Version calls (ms)")
    print(f"{'path':10} {'p50':>8} {'p99':>8} {'mean':>8}")
    for name, make in channels.items():
        with make() as channel:
            s = measure(channel, calls)
        p50, p99, mean = (x * 1e3 for x in (percentile(s, 0.5), percentile(s, 0.99), statistics.mean(s)))
        print(f"{name:10} {p50:8.3f} {p99:8.3f} {mean:8.3f}")
    if big:
        servicer.payload_size = big << 20
        print(f"\n{big} MiB response, 20 calls (MiB/s, median call)")
        for name, make in channels.items():
            with make() as channel:
                call_version(channel)
                s = measure(channel, 20, warmup=2)
            print(f"{name:10} {big / statistics.median(s):8.1f} MiB/s  {statistics.median(s) * 1e3:8.1f} ms")
        servicer.payload_size = 0


def start_tls_grpc(pki: PKI, servicer: VersionServicer) -> tuple[grpc.Server, int]:
    """grpcio's own mTLS port, for comparison with the bridge."""
    creds = grpc.ssl_server_credentials(
        [(pki.read(pki.server_key), pki.read(pki.server_cert))],
        root_certificates=pki.read(pki.ca),
        require_client_auth=True,
    )
    server = grpc.server(ThreadPoolExecutor(8), options=[("grpc.max_send_message_length", 64 << 20)])
    version_pb2_grpc.add_VersionServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, port


async def main(args: argparse.Namespace) -> None:
    directory = short_tempdir("cdbench")
    try:
        pki = make_pki(directory)
        servicer = VersionServicer()
        unix = os.path.join(directory, "grpc.sock")
        server = start_unix_grpc(unix, servicer)
        tls_server, grpc_port = start_tls_grpc(pki, servicer)
        service = BridgeService(
            reactor,
            tls_server_description("tcp:0:interface=127.0.0.1", pki.server_cert, pki.server_key, pki.ca),
            unix,
        )
        await service.startService()
        assert service.port is not None
        bridge = f"127.0.0.1:{service.port.getHost().port}"
        try:
            await deferToThread(run, pki, servicer, unix, f"127.0.0.1:{grpc_port}", bridge, args.calls, args.big)
        finally:
            await service.stopService()
            await deferToThread(lambda: (server.stop(0).wait(), tls_server.stop(0).wait()))
    finally:
        rmtree(directory)


def entry() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--big", type=int, default=8, help="MiB per large response (0 to skip)")
    args = parser.parse_args()
    failures: list[Any] = []

    def done(result: object) -> None:
        if hasattr(result, "printTraceback"):
            failures.append(result)
            result.printTraceback()  # type: ignore[attr-defined]
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(main(args)).addBoth(done))
    reactor.run()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    entry()
