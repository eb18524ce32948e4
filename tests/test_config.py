# -*- test-case-name: tests.test_config -*-
"""Tests for cdtwist.config: containerd's config.toml, imports, plugin sections."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import toml
from twisted.trial.unittest import SynchronousTestCase

from cdtwist import config as cfgmod
from cdtwist.config import (
    CgroupConfig,
    Config,
    ConfigError,
    DebugConfig,
    GRPCConfig,
    MetricsConfig,
    Overrides,
    ProxyPlugin,
    StreamProcessor,
    TTRPCConfig,
    default_toml,
    dump_toml,
    load,
    parse_duration,
    parse_duration_ns,
)
from cdtwist.plugin import CONTENT, GC, GRPC, INTERNAL, SNAPSHOTTER, Registration, Registry

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "config")
CONTAINERD_DEFAULT = os.path.join(DATA, "containerd-default.toml")
DEBIAN = os.path.join(DATA, "debian.toml")
V1 = os.path.join(DATA, "v1.toml")
IMPORTS = os.path.join(DATA, "imports")
MAIN = os.path.join(IMPORTS, "main.toml")

SCHEDULER = f"{GC}.scheduler"
OPT = f"{INTERNAL}.opt"
CRI = f"{GRPC}.cri"
RUNTIME_V1 = "io.containerd.runtime.v1"


# --- small plugin configs, shaped like containerd's ---------------------------


@dataclass
class SchedulerConfig:
    pause_threshold: float = 0.02
    deletion_threshold: int = 0
    mutation_threshold: int = 100
    schedule_delay: str = "0s"
    startup_delay: str = "100ms"


@dataclass
class OptConfig:
    path: str = "/opt/containerd"


@dataclass
class LinuxConfig:
    shim: str = "containerd-shim"
    runtime: str = "runc"
    no_shim: bool = False


@dataclass
class SnapshotterConfig:
    root_path: str = ""


@dataclass
class CNIConfig:
    bin_dir: str = "/opt/cni/bin"
    conf_dir: str = "/etc/cni/net.d"
    max_conf_num: int = 1


@dataclass
class RuntimeConfig:
    runtime_type: str = ""
    privileged_without_host_devices: bool = False
    options: dict[str, Any] = field(default_factory=dict)


def _runtimes() -> dict[str, RuntimeConfig]:
    return {"runc": RuntimeConfig(runtime_type="io.containerd.runc.v2")}


@dataclass
class CRIConfig:
    sandbox_image: str = "registry.k8s.io/pause:3.6"
    stats_collect_period: int = 10
    enable_selinux: bool = False
    stream_idle_timeout: str = "4h0m0s"
    cni: CNIConfig = field(default_factory=CNIConfig)
    runtimes: dict[str, RuntimeConfig] = field(default_factory=_runtimes)
    platforms: list[str] = field(default_factory=lambda: ["linux/amd64"])


@dataclass
class OddConfig:
    ratio: float = 1.5
    label: str | None = None
    mode: Literal["shared", "isolated"] = "shared"
    ports: list[int] = field(default_factory=list)
    pair: tuple[int, int] = (1, 2)
    either: int | str = 0
    raw: Any = None
    table: dict = field(default_factory=dict)
    dashed: str = field(default="d", metadata={"toml": "dashed-key"})

    def __post_init__(self) -> None:
        if self.ratio < 0:
            raise ValueError("ratio must not be negative")


def _init(ic: object) -> None:
    return None


def make_registry(cri: bool = False, odd: bool = False) -> Registry:
    """A registry of our own, never the process-wide one."""
    reg = Registry()
    reg.register(Registration(GC, "scheduler", _init, config=SchedulerConfig))
    reg.register(Registration(INTERNAL, "opt", _init, config=OptConfig))
    reg.register(Registration(CONTENT, "content", _init))
    reg.register(Registration(RUNTIME_V1, "linux", _init, config=LinuxConfig))
    reg.register(Registration(SNAPSHOTTER, "aufs", _init))
    reg.register(Registration(SNAPSHOTTER, "overlayfs", _init, config=SnapshotterConfig))
    if cri:
        reg.register(Registration(GRPC, "cri", _init, config=CRIConfig))
    if odd:
        reg.register(Registration("io.containerd.odd.v1", "odd", _init, config=OddConfig))
    return reg


def _reg(registry: Registry, uri: str) -> Registration:
    r = registry.get(uri)
    assert r is not None, uri
    return r


def _top(config: Config) -> Config:
    """``config`` without its plugin tables, for comparing everything else."""
    return dataclasses.replace(config, plugins={})


class _FilesMixin:
    def write(self, text: str, name: str = "config.toml", directory: str | None = None) -> str:
        if directory is None:
            directory = self.mktemp()  # type: ignore[attr-defined]
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, name)
        mode = "wb" if isinstance(text, bytes) else "w"
        with open(path, mode) as f:
            f.write(text)
        return path


# --- tests ---------------------------------------------------------------------


class DefaultsTests(SynchronousTestCase):
    def test_dataclass_defaults(self) -> None:
        """The defaults are containerd's (command/config.go, defaults/defaults_unix.go)."""
        c = Config()
        self.assertEqual(c.version, 2)
        self.assertEqual(c.root, "/var/lib/containerd")
        self.assertEqual(c.state, "/run/containerd")
        self.assertEqual((c.temp, c.plugin_dir, c.oom_score), ("", "", 0))
        self.assertEqual(
            c.grpc,
            GRPCConfig("/run/containerd/containerd.sock", "", "", "", "", 0, 0, 16777216, 16777216),
        )
        self.assertEqual(c.ttrpc, TTRPCConfig("", 0, 0))
        self.assertEqual(c.debug, DebugConfig("", 0, 0, "", ""))
        self.assertEqual(c.metrics, MetricsConfig("", False))
        self.assertEqual(c.cgroup, CgroupConfig(""))
        self.assertEqual((c.disabled_plugins, c.required_plugins, c.imports), ([], [], []))
        self.assertEqual((c.proxy_plugins, c.plugins), ({}, {}))
        self.assertEqual(
            c.timeouts,
            {
                "io.containerd.timeout.bolt.open": "0s",
                "io.containerd.timeout.shim.cleanup": "5s",
                "io.containerd.timeout.shim.load": "5s",
                "io.containerd.timeout.shim.shutdown": "3s",
                "io.containerd.timeout.task.state": "2s",
            },
        )
        self.assertEqual(
            sorted(c.stream_processors),
            ["io.containerd.ocicrypt.decoder.v1.tar", "io.containerd.ocicrypt.decoder.v1.tar.gzip"],
        )

    def test_defaults_not_shared(self) -> None:
        a, b = Config(), Config()
        a.timeouts["x"] = "1s"
        a.stream_processors["io.containerd.ocicrypt.decoder.v1.tar"].args.append("x")
        self.assertEqual(b, Config())

    def test_load_none(self) -> None:
        """No file: defaults, with the ttrpc socket derived from the grpc one."""
        c = load(None)
        self.assertEqual(c.version, 2)
        self.assertEqual(c.ttrpc.address, "/run/containerd/containerd.sock.ttrpc")
        self.assertEqual(c.warnings, [])
        self.assertEqual(c.imports, [])
        expected = Config()
        expected.ttrpc.address = "/run/containerd/containerd.sock.ttrpc"
        self.assertEqual(c, expected)

    def test_equality_ignores_provenance(self) -> None:
        a, b = Config(), Config()
        a.imports = ["/x.toml"]
        a.warnings.append("w")
        a.origins["root"] = "/x.toml"
        self.assertEqual(a, b)
        b.root = "/elsewhere"
        self.assertNotEqual(a, b)


class ContainerdFilesTests(SynchronousTestCase):
    def test_containerd_default(self) -> None:
        """``containerd config default`` loads cleanly and matches our defaults."""
        c = load(CONTAINERD_DEFAULT)
        self.assertEqual(c.warnings, [])
        self.assertEqual(c.version, 2)
        self.assertEqual(_top(c), load(None))
        self.assertIn(CRI, c.plugins)
        self.assertEqual(c.plugins[OPT], {"path": "/opt/containerd"})
        self.assertEqual(c.imports, [CONTAINERD_DEFAULT])

    def test_containerd_default_plugin_sections(self) -> None:
        """Sections decode into our plugins' configs; the rest are reported, not errors."""
        c = load(CONTAINERD_DEFAULT)
        registry = make_registry()
        self.assertEqual(c.plugin_config(_reg(registry, SCHEDULER)), SchedulerConfig())
        self.assertEqual(c.plugin_config(_reg(registry, OPT)), OptConfig())
        self.assertEqual(c.warnings, [])
        unknown = c.unknown_plugin_sections(registry)
        self.assertIn(CRI, unknown)
        self.assertNotIn(SCHEDULER, unknown)
        known = {r.uri for r in registry}
        self.assertEqual(unknown, [k for k in c.plugins if k not in known])
        self.assertNotIn(f"{SNAPSHOTTER}.aufs", unknown)  # registered, even without a config
        self.assertIn(
            f'{CONTAINERD_DEFAULT}: plugins."io.containerd.grpc.v1.cri": no such plugin, section ignored',
            c.plugin_section_warnings(registry),
        )

    def test_debian(self) -> None:
        c = load(DEBIAN)
        self.assertEqual(c.warnings, [])
        self.assertEqual(c.version, 2)
        registry = make_registry()
        self.assertEqual(c.plugin_config(_reg(registry, OPT)), OptConfig("/var/lib/containerd/opt"))
        self.assertEqual(c.unknown_plugin_sections(registry), [CRI])
        self.assertEqual(
            c.plugin_section_warnings(registry),
            [f'{DEBIAN}: plugins."io.containerd.grpc.v1.cri": no such plugin, section ignored'],
        )

    def test_debian_with_cri(self) -> None:
        """Nested tables merge into the defaults; only the keys given change."""
        c = load(DEBIAN)
        registry = make_registry(cri=True)
        cri = c.plugin_config(_reg(registry, CRI))
        self.assertEqual(cri, CRIConfig(cni=CNIConfig(bin_dir="/usr/lib/cni")))
        self.assertEqual(c.unknown_plugin_sections(registry), [])
        self.assertEqual(c.plugin_section_warnings(registry), [])
        self.assertEqual(c.warnings, [])


class VersionTests(SynchronousTestCase, _FilesMixin):
    def test_v1_short_ids(self) -> None:
        """A file without ``version`` is version 1: plugin sections and lists use ids."""
        c = load(V1)
        registry = make_registry(cri=True)
        self.assertEqual(c.version, 1)
        self.assertTrue(c.is_v1)
        self.assertEqual(c.root, "/srv/containerd")
        self.assertEqual(c.plugin_config(_reg(registry, OPT)), OptConfig("/srv/opt"))
        self.assertEqual(
            c.plugin_config(_reg(registry, f"{RUNTIME_V1}.linux")),
            LinuxConfig(shim="containerd-shim-custom", no_shim=True),
        )
        cri = c.plugin_config(_reg(registry, CRI))
        self.assertEqual(
            cri,
            CRIConfig(
                sandbox_image="k8s.gcr.io/pause:3.2",
                stats_collect_period=5,
                cni=CNIConfig(bin_dir="/usr/lib/cni"),
            ),
        )
        self.assertIn(f"{V1}: plugins.cri.containerd: unknown section, ignored", c.warnings)
        self.assertTrue(c.is_disabled(_reg(registry, f"{SNAPSHOTTER}.aufs")))
        self.assertFalse(c.is_disabled(_reg(registry, f"{SNAPSHOTTER}.overlayfs")))
        self.assertTrue(c.is_required(_reg(registry, OPT)))

    def test_v1_deprecation_warning(self) -> None:
        c = load(V1)
        self.assertTrue([w for w in c.warnings if w.startswith(f"{V1}: containerd config version `1`")])

    def test_v1_uri_section_unused(self) -> None:
        """Version 1 reads ``[plugins.opt]``; a URI-keyed section is reported as unused."""
        c = load(V1)
        registry = make_registry(cri=True)
        self.assertEqual(c.unknown_plugin_sections(registry), [OPT])
        unknown = c.plugin_section_warnings(registry)
        self.assertEqual(len(unknown), 1)
        self.assertTrue(
            unknown[0].startswith(f'{V1}: plugins."io.containerd.internal.v1.opt": no such plugin id')
        )
        self.assertIn("version = 2", unknown[0])

    def test_explicit_version_1(self) -> None:
        path = self.write('version = 1\n[plugins.opt]\npath = "/v1/opt"\n')
        c = load(path)
        self.assertEqual(c.version, 1)
        self.assertEqual(c.plugin_config(_reg(make_registry(), OPT)), OptConfig("/v1/opt"))

    def test_v2_short_id_warns(self) -> None:
        """containerd refuses non-URI plugin keys in version 2; we warn and ignore the section."""
        path = self.write('version = 2\n[plugins.opt]\npath = "/x"\n[plugins.cri.cni]\nbin_dir = "/y"\n')
        c = load(path)
        self.assertEqual(c.plugins, {})
        self.assertIn(
            f"{path}: plugins.opt: not a plugin URI (io.containerd.x.vN.id) in a version 2 config, "
            "section ignored",
            c.warnings,
        )
        self.assertEqual(len(c.warnings), 2)
        self.assertEqual(c.plugin_config(_reg(make_registry(), OPT)), OptConfig())

    def test_v2_disabled_short_id(self) -> None:
        path = self.write('version = 2\ndisabled_plugins = ["io.containerd.snapshotter.v1.zfs", "aufs"]\n')
        e = self.assertRaises(ConfigError, load, path)
        self.assertEqual(
            str(e),
            f'{path}: disabled_plugins: invalid plugin URI "aufs", expected io.containerd.x.vN.id '
            "in a version 2 config",
        )

    def test_v2_required_short_id(self) -> None:
        path = self.write('version = 2\nrequired_plugins = ["cri"]\n')
        e = self.assertRaises(ConfigError, load, path)
        self.assertIn("required_plugins", str(e))

    def test_v2_filters_by_uri(self) -> None:
        path = self.write(
            f'version = 2\ndisabled_plugins = ["{SNAPSHOTTER}.aufs"]\nrequired_plugins = ["{OPT}"]\n'
        )
        c = load(path)
        registry = make_registry()
        self.assertTrue(c.is_disabled(_reg(registry, f"{SNAPSHOTTER}.aufs")))
        self.assertTrue(c.is_required(_reg(registry, OPT)))
        self.assertFalse(c.is_required(_reg(registry, SCHEDULER)))

    def test_version_from_import(self) -> None:
        """The version is a property of the merged config, as in containerd."""
        d = self.mktemp()
        self.write('version = 2\n[plugins."io.containerd.internal.v1.opt"]\npath = "/x"\n', "v2.toml", d)
        main = self.write('imports = ["v2.toml"]\n', "main.toml", d)
        c = load(main)
        self.assertEqual(c.version, 2)
        self.assertEqual(c.plugin_config(_reg(make_registry(), OPT)), OptConfig("/x"))

    def test_bad_version(self) -> None:
        path = self.write("version = -1\n")
        e = self.assertRaises(ConfigError, load, path)
        self.assertEqual(str(e), f"{path}: version: expected 1 or 2, got -1")


class ImportTests(SynchronousTestCase, _FilesMixin):
    def test_order(self) -> None:
        """Breadth first, globs sorted (dot files included), each file once."""
        c = load(MAIN)
        self.assertEqual(
            c.imports,
            [
                MAIN,
                os.path.join(IMPORTS, "conf.d", ".05-hidden.toml"),
                os.path.join(IMPORTS, "conf.d", "10-first.toml"),
                os.path.join(IMPORTS, "conf.d", "20-second.toml"),
                os.path.join(IMPORTS, "extra.toml"),
                os.path.join(IMPORTS, "nested", "deep.toml"),
            ],
        )

    def test_merge(self) -> None:
        """The same result as ``containerd --config main.toml config dump``."""
        c = load(MAIN)
        self.assertEqual(c.warnings, [])
        self.assertEqual(c.root, "/first/root")
        self.assertEqual(c.state, "/deep/state")
        self.assertEqual(c.temp, "/hidden/tmp")
        # zero values never override: extra.toml's oom_score = 0, 10-first.toml's uid = 0
        self.assertEqual(c.oom_score, -500)
        self.assertEqual((c.grpc.address, c.grpc.uid, c.grpc.gid), ("/main/containerd.sock", 1000, 42))
        self.assertEqual(c.ttrpc, TTRPCConfig("/main/containerd.sock.ttrpc", 1000, 42))
        self.assertTrue(c.metrics.grpc_histogram)
        # arrays are appended
        self.assertEqual(
            c.disabled_plugins,
            ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs"],
        )
        # maps merge by key
        self.assertEqual(c.timeouts["io.containerd.timeout.shim.load"], "10s")
        self.assertEqual(c.timeouts["io.containerd.timeout.task.state"], "4s")
        self.assertEqual(c.timeouts["io.containerd.timeout.shim.shutdown"], "3s")
        self.assertEqual(
            c.stream_processors["custom"],
            StreamProcessor(
                ["application/x-custom"], "application/x-plain", "/usr/bin/custom-decoder", [], []
            ),
        )
        self.assertEqual(len(c.stream_processors), 3)

    def test_plugin_sections_replaced(self) -> None:
        """A later file replaces a whole plugin section; defaults fill the rest."""
        c = load(MAIN)
        self.assertEqual(c.plugins[SCHEDULER], {"deletion_threshold": 3})
        registry = make_registry()
        self.assertEqual(c.plugin_config(_reg(registry, SCHEDULER)), SchedulerConfig(deletion_threshold=3))
        self.assertEqual(c.plugin_config(_reg(registry, OPT)), OptConfig("/deep/opt"))

    def test_origins(self) -> None:
        c = load(MAIN)
        self.assertEqual(c.origin(f'plugins."{OPT}"'), os.path.join(IMPORTS, "nested", "deep.toml"))
        self.assertEqual(c.origin(f'plugins."{SCHEDULER}"'), os.path.join(IMPORTS, "conf.d", "10-first.toml"))
        self.assertEqual(c.origin("root"), os.path.join(IMPORTS, "conf.d", "10-first.toml"))
        self.assertEqual(c.origin("grpc.uid"), MAIN)
        self.assertEqual(c.origin("cgroup.path"), "<defaults>")

    def test_overrides(self) -> None:
        """Flags win over every file; empty flags are not set (containerd's applyFlags)."""
        c = load(MAIN, Overrides(address="/flag.sock", root="/flag/root", state="", log_level="debug"))
        self.assertEqual(c.root, "/flag/root")
        self.assertEqual(c.state, "/deep/state")
        self.assertEqual(c.grpc.address, "/flag.sock")
        self.assertEqual(c.ttrpc.address, "/flag.sock.ttrpc")
        self.assertEqual(c.debug.level, "debug")

    def test_relative_import(self) -> None:
        """Plain import paths are relative to the including file, not the working directory."""
        d = self.mktemp()
        self.write('root = "/sub"\n', "sub.toml", os.path.join(d, "dir"))
        main = self.write('imports = ["dir/sub.toml"]\n', "main.toml", d)
        self.assertEqual(load(main).root, "/sub")

    def test_absolute_glob(self) -> None:
        d = os.path.abspath(self.mktemp())
        self.write('root = "/a"\n', "a.toml", os.path.join(d, "c"))
        self.write('root = "/b"\n', "b.toml", os.path.join(d, "c"))
        main = self.write(f'imports = ["{d}/c/*.toml"]\n', "main.toml", d)
        c = load(main)
        self.assertEqual(c.root, "/b")
        self.assertEqual(len(c.imports), 3)

    def test_glob_without_match(self) -> None:
        main = self.write('imports = ["none/*.toml"]\n')
        self.assertEqual(load(main).imports, [main])

    def test_self_import(self) -> None:
        d = self.mktemp()
        main = self.write(
            'imports = ["./config.toml", "config.toml"]\ndisabled_plugins = ["a"]\n', directory=d
        )
        c = load(main)
        self.assertEqual(c.disabled_plugins, ["a"])
        self.assertEqual(c.imports, [main])

    def test_missing_import(self) -> None:
        main = self.write('imports = ["missing.toml"]\n')
        e = self.assertRaises(ConfigError, load, main)
        missing = os.path.join(os.path.dirname(main), "missing.toml")
        self.assertEqual(str(e), f"{main}: imports: cannot read {missing}: No such file or directory")
        self.assertEqual(e.key, "imports")

    def test_bad_imports_type(self) -> None:
        main = self.write('imports = "other.toml"\n')
        e = self.assertRaises(ConfigError, load, main)
        self.assertEqual(str(e), f'{main}: imports: expected an array, got "other.toml"')

    def test_error_in_import_names_import(self) -> None:
        d = self.mktemp()
        sub = self.write("[grpc]\ngid = false\n", "sub.toml", d)
        main = self.write('imports = ["sub.toml"]\n', "main.toml", d)
        e = self.assertRaises(ConfigError, load, main)
        self.assertEqual(str(e), f"{sub}: grpc.gid: expected an integer, got false")

    def test_plugin_error_names_importing_file(self) -> None:
        """A plugin section's type errors name the file the section came from."""
        d = self.mktemp()
        sub = self.write(f'[plugins."{SCHEDULER}"]\nmutation_threshold = "many"\n', "sub.toml", d)
        main = self.write('version = 2\nimports = ["sub.toml"]\n', "main.toml", d)
        c = load(main)
        e = self.assertRaises(ConfigError, c.plugin_config, _reg(make_registry(), SCHEDULER))
        self.assertEqual(
            str(e),
            f'{sub}: plugins."io.containerd.gc.v1.scheduler".mutation_threshold: '
            'expected an integer, got "many"',
        )
        self.assertEqual(e.file, sub)


class ErrorTests(SynchronousTestCase, _FilesMixin):
    def assertLoadError(self, text: str, message: str) -> None:
        path = self.write(text)
        e = self.assertRaises(ConfigError, load, path)
        self.assertEqual(str(e), message.format(path=path))

    def test_wrong_int(self) -> None:
        self.assertLoadError('[grpc]\nuid = "abc"\n', '{path}: grpc.uid: expected an integer, got "abc"')

    def test_bool_is_not_int(self) -> None:
        self.assertLoadError("oom_score = true\n", "{path}: oom_score: expected an integer, got true")

    def test_int_is_not_bool(self) -> None:
        self.assertLoadError(
            "[metrics]\ngrpc_histogram = 1\n", "{path}: metrics.grpc_histogram: expected a boolean, got 1"
        )

    def test_float_is_not_int(self) -> None:
        self.assertLoadError(
            "[grpc]\nmax_recv_message_size = 1.5\n",
            "{path}: grpc.max_recv_message_size: expected an integer, got 1.5",
        )

    def test_int_is_not_str(self) -> None:
        self.assertLoadError("root = 5\n", "{path}: root: expected a string, got 5")

    def test_str_is_not_list(self) -> None:
        self.assertLoadError(
            'disabled_plugins = "x"\n', '{path}: disabled_plugins: expected an array, got "x"'
        )

    def test_list_item(self) -> None:
        self.assertLoadError(
            "version = 2\ndisabled_plugins = [3]\n",
            "{path}: disabled_plugins[0]: expected a string, got 3",
        )

    def test_scalar_is_not_table(self) -> None:
        self.assertLoadError("grpc = 1\n", "{path}: grpc: expected a table, got 1")

    def test_table_is_not_scalar(self) -> None:
        self.assertLoadError("[root]\nx = 1\n", "{path}: root: expected a string, got a table")

    def test_plugin_section_not_table(self) -> None:
        self.assertLoadError(
            f'[plugins]\n"{SCHEDULER}" = 1\n',
            '{path}: plugins."io.containerd.gc.v1.scheduler": expected a table, got 1',
        )

    def test_map_value_type(self) -> None:
        self.assertLoadError(
            '[stream_processors.x]\naccepts = "a"\n',
            '{path}: stream_processors.x.accepts: expected an array, got "a"',
        )
        self.assertLoadError(
            '[proxy_plugins.snap]\ntype = "snapshot"\naddress = 7\n',
            "{path}: proxy_plugins.snap.address: expected a string, got 7",
        )
        self.assertLoadError(
            '[timeouts]\n"io.containerd.timeout.shim.load" = 5\n',
            '{path}: timeouts."io.containerd.timeout.shim.load": expected a string, got 5',
        )

    def test_bad_timeout(self) -> None:
        self.assertLoadError(
            '[timeouts]\n"io.containerd.timeout.shim.load" = "5 seconds"\n',
            '{path}: timeouts."io.containerd.timeout.shim.load": time: unknown unit " seconds" '
            'in duration "5 seconds"',
        )

    def test_date_value(self) -> None:
        self.assertLoadError(
            "root = 1979-05-27\n", "{path}: root: expected a string, got a date/time (1979-05-27)"
        )

    def test_syntax_error(self) -> None:
        path = self.write('version = 2\n\n[grpc\naddress = "x"\n')
        e = self.assertRaises(ConfigError, load, path)
        self.assertTrue(str(e).startswith(f"{path}: line 3: invalid TOML: "), str(e))

    def test_duplicate_key(self) -> None:
        path = self.write('root = "a"\nroot = "b"\n')
        e = self.assertRaises(ConfigError, load, path)
        self.assertTrue(str(e).startswith(f"{path}: line 2: invalid TOML: "), str(e))

    def test_missing_file(self) -> None:
        path = os.path.abspath(self.mktemp())
        e = self.assertRaises(ConfigError, load, path)
        self.assertEqual(str(e), f"{path}: cannot read: No such file or directory")
        self.assertEqual(e.file, path)

    def test_directory(self) -> None:
        path = self.mktemp()
        os.makedirs(path)
        e = self.assertRaises(ConfigError, load, path)
        self.assertEqual(str(e), f"{path}: cannot read: Is a directory")

    def test_not_utf8(self) -> None:
        path = self.write(b'root = "\xff"\n')
        e = self.assertRaises(ConfigError, load, path)
        self.assertEqual(str(e), f"{path}: not UTF-8 (byte 8)")

    def test_bom(self) -> None:
        path = self.write('\ufeffroot = "/bom"\n'.encode())
        self.assertEqual(load(path).root, "/bom")

    def test_log_level(self) -> None:
        self.assertLoadError(
            '[debug]\nlevel = "loud"\n',
            '{path}: debug.level: not a valid log level "loud" '
            "(one of panic, fatal, error, warn, warning, info, debug, trace)",
        )
        path = self.write('[debug]\nlevel = "WARN"\n')
        self.assertEqual(load(path).debug.level, "WARN")

    def test_log_level_flag(self) -> None:
        e = self.assertRaises(ConfigError, load, None, Overrides(log_level="loud"))
        self.assertTrue(str(e).startswith('<command line>: debug.level: not a valid log level "loud"'))

    def test_log_format(self) -> None:
        self.assertLoadError(
            '[debug]\nformat = "xml"\n', '{path}: debug.format: unknown log format "xml" (text or json)'
        )


class WarningTests(SynchronousTestCase, _FilesMixin):
    def test_unknown_keys(self) -> None:
        """Unknown keys and sections anywhere are warnings naming file and key."""
        path = self.write(
            "bogus = 1\n"
            'root = "/r"\n'
            "[grpc]\nextra = 2\n"
            "[grpc.deeper]\nx = 1\n"
            "[nope]\ny = 1\n"
            '[proxy_plugins.snap]\ntype = "snapshot"\naddress = "/s.sock"\ncolor = "red"\n'
            '[stream_processors."a.b"]\nfoo = []\n'
        )
        c = load(path)
        self.assertEqual(c.root, "/r")
        self.assertEqual(c.proxy_plugins, {"snap": ProxyPlugin("snapshot", "/s.sock")})
        self.assertEqual(
            sorted(c.warnings),
            sorted(
                [
                    f"{path}: bogus: unknown key, ignored",
                    f"{path}: grpc.extra: unknown key, ignored",
                    f"{path}: grpc.deeper: unknown section, ignored",
                    f"{path}: nope: unknown section, ignored",
                    f"{path}: proxy_plugins.snap.color: unknown key, ignored",
                    f'{path}: stream_processors."a.b".foo: unknown key, ignored',
                    f"{path}: containerd config version `1` has been deprecated and will be removed in "
                    "containerd v2.0, please switch to version `2`",
                ]
            ),
        )

    def test_unknown_plugin_keys(self) -> None:
        path = self.write(
            f'version = 2\n[plugins."{CRI}"]\nsandbox = "x"\n'
            f'[plugins."{CRI}".cni]\nbin_dir = "/b"\nbinary_dir = "/c"\n'
            f'[plugins."{CRI}".runtimes.kata]\nruntime_type = "k"\nbogus = true\n'
        )
        c = load(path)
        self.assertEqual(c.warnings, [])
        registry = make_registry(cri=True)
        cri = c.plugin_config(_reg(registry, CRI))
        self.assertEqual(cri.cni.bin_dir, "/b")
        prefix = f'{path}: plugins."io.containerd.grpc.v1.cri"'
        expected = [
            f"{prefix}.sandbox: unknown key, ignored",
            f"{prefix}.cni.binary_dir: unknown key, ignored",
            f"{prefix}.runtimes.kata.bogus: unknown key, ignored",
        ]
        self.assertEqual(c.warnings, expected)
        # decoding again does not repeat them
        c.plugin_config(_reg(registry, CRI))
        self.assertEqual(c.warnings, expected)

    def test_plugin_without_config(self) -> None:
        path = self.write(f'version = 2\n[plugins."{CONTENT}.content"]\nx = 1\n')
        c = load(path)
        registry = make_registry()
        self.assertIsNone(c.plugin_config(_reg(registry, f"{CONTENT}.content")))
        self.assertEqual(c.unknown_plugin_sections(registry), [])
        self.assertEqual(
            c.plugin_section_warnings(registry),
            [
                f'{path}: plugins."io.containerd.content.v1.content": '
                "plugin takes no configuration, section ignored"
            ],
        )

    def test_no_warnings_for_known(self) -> None:
        c = load(DEBIAN)
        self.assertEqual(c.unknown_plugin_sections(make_registry(cri=True)), [])
        self.assertEqual(c.plugin_section_warnings(make_registry(cri=True)), [])


class PluginConfigTests(SynchronousTestCase, _FilesMixin):
    def load_plugin(self, body: str, uri: str = "io.containerd.odd.v1.odd") -> Any:
        path = self.write(f'version = 2\n[plugins."{uri}"]\n{body}')
        self.path = path
        self.config = load(path)
        return self.config.plugin_config(_reg(make_registry(cri=True, odd=True), uri))

    def test_no_section(self) -> None:
        c = load(None)
        registry = make_registry()
        self.assertEqual(c.plugin_config(_reg(registry, SCHEDULER)), SchedulerConfig())

    def test_fresh_instances(self) -> None:
        c = load(DEBIAN)
        reg = _reg(make_registry(cri=True), CRI)
        a = c.plugin_config(reg)
        a.cni.bin_dir = "/changed"
        a.runtimes["runc"].options["x"] = 1
        b = c.plugin_config(reg)
        self.assertEqual(b.cni.bin_dir, "/usr/lib/cni")
        self.assertEqual(b.runtimes["runc"].options, {})
        self.assertEqual(c.plugins[CRI], {"cni": {"bin_dir": "/usr/lib/cni", "conf_dir": "/etc/cni/net.d"}})

    def test_not_a_dataclass(self) -> None:
        reg = Registration("io.containerd.x.v1", "x", _init, config=dict)
        self.assertRaises(TypeError, load(None).plugin_config, reg)

    def test_wrong_type(self) -> None:
        e = self.assertRaises(ConfigError, self.load_plugin, 'mutation_threshold = "many"\n', SCHEDULER)
        self.assertEqual(
            str(e),
            f'{self.path}: plugins."io.containerd.gc.v1.scheduler".mutation_threshold: '
            'expected an integer, got "many"',
        )
        self.assertEqual(e.key, 'plugins."io.containerd.gc.v1.scheduler".mutation_threshold')

    def test_float_takes_int(self) -> None:
        sched = self.load_plugin("pause_threshold = 1\n", SCHEDULER)
        self.assertEqual(sched.pause_threshold, 1.0)
        self.assertIsInstance(sched.pause_threshold, float)

    def test_int_rejects_float(self) -> None:
        e = self.assertRaises(ConfigError, self.load_plugin, "mutation_threshold = 1.5\n", SCHEDULER)
        self.assertIn("mutation_threshold: expected an integer, got 1.5", str(e))

    def test_dict_replaced(self) -> None:
        """A map in a plugin config is replaced whole (go-toml): runc is gone once kata is set."""
        cri = self.load_plugin(
            '[plugins."io.containerd.grpc.v1.cri".runtimes.kata]\nruntime_type = "io.containerd.kata.v2"\n'
            '[plugins."io.containerd.grpc.v1.cri".runtimes.kata.options]\nConfigPath = "/k.toml"\n',
            CRI,
        )
        self.assertEqual(
            cri.runtimes,
            {"kata": RuntimeConfig(runtime_type="io.containerd.kata.v2", options={"ConfigPath": "/k.toml"})},
        )
        self.assertEqual(cri.cni, CNIConfig())

    def test_list_item(self) -> None:
        # (the toml package refuses mixed arrays, so the bad item is the first)
        e = self.assertRaises(ConfigError, self.load_plugin, "platforms = [[1]]\n", CRI)
        self.assertIn(
            'plugins."io.containerd.grpc.v1.cri".platforms[0]: expected a string, got an array', str(e)
        )

    def test_nested_wrong_type(self) -> None:
        e = self.assertRaises(ConfigError, self.load_plugin, 'cni = "x"\n', CRI)
        self.assertIn('plugins."io.containerd.grpc.v1.cri".cni: expected a table, got "x"', str(e))

    def test_v1_path(self) -> None:
        path = self.write("[plugins.cri]\nstats_collect_period = true\n")
        c = load(path)
        e = self.assertRaises(ConfigError, c.plugin_config, _reg(make_registry(cri=True), CRI))
        self.assertEqual(str(e), f"{path}: plugins.cri.stats_collect_period: expected an integer, got true")

    def test_odd_defaults(self) -> None:
        self.assertEqual(self.load_plugin(""), OddConfig())

    def test_odd_values(self) -> None:
        odd = self.load_plugin(
            'label = "l"\nmode = "isolated"\nports = [1, 2]\npair = [3, 4]\neither = "s"\n'
            'raw = [1, 2]\ntable = {a = 1}\n"dashed-key" = "D"\n'
        )
        self.assertEqual(
            odd,
            OddConfig(
                label="l",
                mode="isolated",
                ports=[1, 2],
                pair=(3, 4),
                either="s",
                raw=[1, 2],
                table={"a": 1},
                dashed="D",
            ),
        )
        self.assertEqual(self.config.warnings, [])

    def test_odd_errors(self) -> None:
        prefix = 'plugins."io.containerd.odd.v1.odd"'
        for body, message in [
            ("label = 1\n", f"{prefix}.label: expected a string, got 1"),
            ('mode = "both"\n', f'{prefix}.mode: expected one of "shared", "isolated", got "both"'),
            ('ports = ["1", "2"]\n', f'{prefix}.ports[0]: expected an integer, got "1"'),
            ("pair = [1, 2, 3]\n", f"{prefix}.pair: expected an array of 2 items, got 3"),
            ("either = true\n", f"{prefix}.either: expected an integer or a string, got true"),
            ("table = 1\n", f"{prefix}.table: expected a table, got 1"),
            ("ratio = -1\n", f"{prefix}: ratio must not be negative"),
            ("dashed = 'x'\n", None),
        ]:
            if message is None:
                self.load_plugin(body)
                self.assertIn(f"{self.path}: {prefix}.dashed: unknown key, ignored", self.config.warnings)
                continue
            e = self.assertRaises(ConfigError, self.load_plugin, body)
            self.assertEqual(str(e), f"{self.path}: {message}")


class DurationTests(SynchronousTestCase):
    S = 1_000_000_000

    def test_valid(self) -> None:
        """Go's time.ParseDuration test table."""
        s, ms, us, m, h = self.S, 1_000_000, 1_000, 60 * self.S, 3600 * self.S
        for text, ns in [
            ("0", 0),
            ("5s", 5 * s),
            ("30s", 30 * s),
            ("1478s", 1478 * s),
            ("-5s", -5 * s),
            ("+5s", 5 * s),
            ("-0", 0),
            ("+0", 0),
            ("5.0s", 5 * s),
            ("5.6s", 5 * s + 600 * ms),
            ("5.s", 5 * s),
            (".5s", 500 * ms),
            ("1.0s", s),
            ("1.00s", s),
            ("1.004s", s + 4 * ms),
            ("1.0040s", s + 4 * ms),
            ("100.00100s", 100 * s + 1 * ms),
            ("10ns", 10),
            ("11us", 11 * us),
            ("12\u00b5s", 12 * us),
            ("12\u03bcs", 12 * us),
            ("13ms", 13 * ms),
            ("14s", 14 * s),
            ("15m", 15 * m),
            ("16h", 16 * h),
            ("3h30m", 3 * h + 30 * m),
            ("10.5s4m", 4 * m + 10 * s + 500 * ms),
            ("-2m3.4s", -(2 * m + 3 * s + 400 * ms)),
            ("1h2m3s4ms5us6ns", h + 2 * m + 3 * s + 4 * ms + 5 * us + 6),
            ("39h9m14.425s", 39 * h + 9 * m + 14 * s + 425 * ms),
            ("52763797000ns", 52763797000),
            ("0.3333333333333333333h", 20 * m),
            ("9007199254740993ns", (1 << 53) + 1),
            ("9223372036854775807ns", (1 << 63) - 1),
            ("9223372036854775.807us", (1 << 63) - 1),
            ("9223372036854ms775us807ns", (1 << 63) - 1),
            ("-9223372036854775808ns", -(1 << 63)),
            ("-9223372036854775.808us", -(1 << 63)),
            ("0.100000000000000000000h", 6 * m),
            ("0.830103483285477580700h", 49 * m + 48 * s + 372539827),
            ("4h0m0s", 4 * h),
            ("1m30s", 90 * s),
            ("100ms", 100 * ms),
        ]:
            self.assertEqual(parse_duration_ns(text), ns, text)
        self.assertEqual(parse_duration("1m30s"), 90.0)
        self.assertEqual(parse_duration("100ms"), 0.1)
        self.assertEqual(parse_duration("-1.5h"), -5400.0)

    def test_invalid(self) -> None:
        for text in [
            "",
            "3",
            "-",
            "s",
            ".",
            "-.",
            ".s",
            "+.s",
            "1d",
            "\x85\x85",
            "\xffff",
            "hello \xffff world",
            "9223372036854775808ns",
            "9223372036854775.808us",
            "9223372036854ms775us808ns",
            "-9223372036854775809ns",
            "5s ",
            " 5s",
            "1_000s",
            "\u0663s",
            "5 s",
        ]:
            self.assertRaises(ValueError, parse_duration, text)

    def test_messages(self) -> None:
        for text, message in [
            ("abc", 'time: invalid duration "abc"'),
            ("3", 'time: missing unit in duration "3"'),
            ("1d", 'time: unknown unit "d" in duration "1d"'),
        ]:
            e = self.assertRaises(ValueError, parse_duration, text)
            self.assertEqual(str(e), message)


class DumpTests(SynchronousTestCase, _FilesMixin):
    def reload(self, text: str) -> Config:
        return load(self.write(text))

    def test_default_toml_matches_containerd(self) -> None:
        """Everything outside [plugins] is what ``containerd config default`` prints."""
        ours = toml.loads(default_toml(make_registry()))
        theirs = toml.load(CONTAINERD_DEFAULT)
        ours_plugins, theirs_plugins = ours.pop("plugins"), theirs.pop("plugins")
        self.assertEqual(ours, theirs)
        self.assertEqual(ours_plugins[SCHEDULER], theirs_plugins[SCHEDULER])
        self.assertEqual(ours_plugins[OPT], theirs_plugins[OPT])

    def test_default_toml_sections(self) -> None:
        """Every registered plugin with a config gets its defaults, by URI."""
        data = toml.loads(default_toml(make_registry(cri=True)))
        self.assertEqual(
            sorted(data["plugins"]),
            sorted([SCHEDULER, OPT, CRI, f"{RUNTIME_V1}.linux", f"{SNAPSHOTTER}.overlayfs"]),
        )
        self.assertEqual(data["plugins"][CRI]["runtimes"]["runc"]["runtime_type"], "io.containerd.runc.v2")
        self.assertEqual(data["version"], 2)

    def test_default_toml_loads_back(self) -> None:
        registry = make_registry(cri=True, odd=True)
        c = self.reload(default_toml(registry))
        self.assertEqual(c.warnings, [])
        self.assertEqual(c.unknown_plugin_sections(registry), [])
        self.assertEqual(_top(c), load(None))
        for reg in registry:
            self.assertEqual(c.plugin_config(reg), reg.config() if reg.config else None)
        again = self.reload(dump_toml(c, registry))
        self.assertEqual(again, c)

    def test_dump_round_trip(self) -> None:
        registry = make_registry(cri=True)
        c = load(MAIN, Overrides(root="/flag/root", log_level="info"))
        text = dump_toml(c, registry)
        back = self.reload(text)
        self.assertEqual(back.warnings, [])
        self.assertEqual(_top(back), _top(c))
        for reg in registry:
            self.assertEqual(back.plugin_config(reg), c.plugin_config(reg))
        self.assertEqual(self.reload(dump_toml(back, registry)), back)
        self.assertEqual(back.root, "/flag/root")
        self.assertEqual(back.debug.level, "info")

    def test_dump_mentions_files_not_imports(self) -> None:
        """The dump is self-contained: the files read are comments, not imports."""
        c = load(MAIN)
        text = dump_toml(c, make_registry())
        self.assertTrue(text.startswith(f"# loaded from {MAIN}\n"))
        self.assertEqual(toml.loads(text)["imports"], [])

    def test_dump_filled_sections(self) -> None:
        c = load(MAIN)
        data = toml.loads(dump_toml(c, make_registry()))
        self.assertEqual(
            data["plugins"][SCHEDULER], dataclasses.asdict(SchedulerConfig(deletion_threshold=3))
        )
        self.assertEqual(data["plugins"][OPT], {"path": "/deep/opt"})

    def test_dump_drops_unknown_sections(self) -> None:
        c = load(DEBIAN)
        data = toml.loads(dump_toml(c, make_registry()))
        self.assertNotIn(CRI, data["plugins"])
        self.assertNotIn(f"{CONTENT}.content", data["plugins"])

    def test_dump_v1(self) -> None:
        """A version 1 config dumps as version 2: URIs for sections and lists."""
        registry = make_registry(cri=True)
        c = load(V1)
        data = toml.loads(dump_toml(c, registry))
        self.assertEqual(data["version"], 2)
        # zfs is registered nowhere: disabling it was a no-op
        self.assertEqual(data["disabled_plugins"], [f"{SNAPSHOTTER}.aufs"])
        self.assertEqual(data["required_plugins"], [OPT])
        self.assertEqual(data["plugins"][OPT], {"path": "/srv/opt"})
        back = load(self.write(dump_toml(c, registry)))
        self.assertEqual(back.version, 2)
        for reg in registry:
            self.assertEqual(back.plugin_config(reg), c.plugin_config(reg))
            self.assertEqual(back.is_disabled(reg), c.is_disabled(reg))
            self.assertEqual(back.is_required(reg), c.is_required(reg))

    def test_awkward_strings(self) -> None:
        """Backslashes, quotes and control characters survive (toml 0.10.2 alone mangles them)."""
        registry = make_registry(odd=True)
        awkward = 'C:\\x "q" \n\t\x01 \u00b5 \x7f \\'
        c = load(None)
        c.root = awkward
        c.state = "\\u0041"
        c.plugins["io.containerd.odd.v1.odd"] = {"label": awkward, "raw": {"k": [awkward]}}
        back = self.reload(dump_toml(c, registry))
        self.assertEqual((back.root, back.state), (awkward, "\\u0041"))
        odd = back.plugin_config(_reg(registry, "io.containerd.odd.v1.odd"))
        self.assertEqual((odd.label, odd.raw), (awkward, {"k": [awkward]}))

    def test_none_left_out(self) -> None:
        data = toml.loads(default_toml(make_registry(odd=True)))
        self.assertNotIn("label", data["plugins"]["io.containerd.odd.v1.odd"])
        self.assertNotIn("raw", data["plugins"]["io.containerd.odd.v1.odd"])

    def test_module_api(self) -> None:
        for name in cfgmod.__all__:
            self.assertTrue(hasattr(cfgmod, name), name)
