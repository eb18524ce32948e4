# -*- test-case-name: tests.test_cli -*-
"""The ``cdtwist`` command: configuration tools beside the twistd daemon.

The daemon itself runs under twistd (``twistd -n cdtwist``); ``cdtwist run``
is a shortcut for exactly that, so operators who know ``containerd`` find
the same verbs here.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from cdtwist import SERVER_VERSION, revision


def _registry():  # type: ignore[no-untyped-def]
    from cdtwist.plugin import registry
    from cdtwist.plugin.loader import load_builtin

    load_builtin()
    return registry


def cmd_config_default(args: argparse.Namespace) -> int:
    from cdtwist.config import default_toml

    sys.stdout.write(default_toml(_registry()))
    return 0


def cmd_config_dump(args: argparse.Namespace) -> int:
    from cdtwist.config import ConfigError, Overrides, dump_toml, load
    from cdtwist.plugin import PluginError
    from cdtwist.plugin.loader import load_entry_points, load_plugin_dir

    try:
        config = load(args.config, Overrides(address=args.address, root=args.root, state=args.state))
        registry = _registry()
        load_plugin_dir(config.plugin_dir)
        load_entry_points()
        text = dump_toml(config, registry)
    except (ConfigError, PluginError) as e:
        print(f"cdtwist: {e}", file=sys.stderr)
        return 1
    for warning in config.warnings:
        print(f"cdtwist: warning: {warning}", file=sys.stderr)
    sys.stdout.write(text)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    argv = ["twistd", "--nodaemon", "--pidfile=", "cdtwist"]
    if args.config:
        argv += ["--config", args.config]
    for flag in ("address", "root", "state", "log_level"):
        value = getattr(args, flag)
        if value:
            argv += [f"--{flag.replace('_', '-')}", value]
    from twisted.scripts.twistd import run

    sys.argv = argv
    run()
    return 0


def cmd_serve_plugin(args: argparse.Namespace, rest: list[str]) -> int:
    """``twistd`` running the serve-plugin application in the foreground."""
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", "--nodaemon", "--pidfile=", "cdtwist-serve-plugin", *rest]
    run()
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    """``containerd publish``: what shims exec to publish an event (an Any on stdin)."""
    import grpc
    from google.protobuf import any_pb2

    from cdtwist.api.services.events.v1 import events_pb2, events_pb2_grpc

    if not args.topic:
        print("cdtwist: topic required to publish event: invalid argument", file=sys.stderr)
        return 1
    event = any_pb2.Any()
    try:
        event.ParseFromString(sys.stdin.buffer.read())
    except Exception as e:
        print(f"cdtwist: {e}", file=sys.stderr)
        return 1
    target = args.address if "://" in args.address or args.address.startswith("unix:") else "unix:" + args.address
    metadata = [("containerd-namespace", args.namespace)] if args.namespace else []
    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=2)
            events_pb2_grpc.EventsStub(channel).Publish(
                events_pb2.PublishRequest(topic=args.topic, event=event), metadata=metadata, timeout=10
            )
        except grpc.FutureTimeoutError:
            print(f'cdtwist: failed to dial "{args.address}": context deadline exceeded', file=sys.stderr)
            return 1
        except grpc.RpcError as e:
            print(f"cdtwist: {e.details()}", file=sys.stderr)
            return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdtwist", description="containerd 1.6 compatible daemon on Twisted")
    parser.add_argument(
        "--version", "-v", action="version", version=f"cdtwist {SERVER_VERSION} {revision()}"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    config = sub.add_parser("config", help="information on the cdtwist config")
    config_sub = config.add_subparsers(dest="config_command", metavar="COMMAND")
    default = config_sub.add_parser("default", help="print the default cdtwist config")
    default.set_defaults(func=cmd_config_default)
    dump = config_sub.add_parser("dump", help="print the effective config: file, imports and flags")
    _daemon_flags(dump)
    dump.set_defaults(func=cmd_config_dump)

    publish = sub.add_parser("publish", help="binary to publish events to cdtwist (reads an Any from stdin)")
    publish.add_argument("--address", "-a", default="/run/containerd/containerd.sock")
    publish.add_argument("--namespace")
    publish.add_argument("--topic")
    publish.set_defaults(func=cmd_publish)

    serve = sub.add_parser(
        "serve-plugin",
        help="serve a snapshotter (overlayfs, native) or the content store for a daemon's [proxy_plugins]",
        add_help=False,
    )
    serve.set_defaults(func=cmd_serve_plugin, passthrough=True)

    run = sub.add_parser("run", help="run the daemon in the foreground (twistd -n cdtwist)")
    _daemon_flags(run)
    run.add_argument("--log-level", "-l")
    run.set_defaults(func=cmd_run)
    return parser


def _daemon_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=os.environ.get("CDTWIST_CONFIG"))
    parser.add_argument("--address", "-a")
    parser.add_argument("--root")
    parser.add_argument("--state")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Shims exec the publish binary containerd's way, global flags first:
    # `cdtwist --address X publish --topic T --namespace N`.
    if "publish" in argv and argv[0] != "publish":
        from cdtwist.runtime.publish import main as publish_main

        return publish_main(argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    if getattr(args, "passthrough", False):
        # twistd's own option parser reads these (cdtwist serve-plugin --help too).
        return int(func(args, rest))
    if rest:
        parser.error("unrecognized arguments: " + " ".join(rest))
    return int(func(args))


if __name__ == "__main__":
    sys.exit(main())
