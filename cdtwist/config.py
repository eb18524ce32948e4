# -*- test-case-name: tests.test_config -*-
"""containerd's ``config.toml``: loading, merging imports, plugin sections.

The keys, defaults and merge rules are those of containerd 1.6
(``services/server/config/config.go``) so an existing containerd config
works unchanged.  Where containerd would refuse to start over something
harmless (unknown keys, a non-URI plugin section in a version 2 file) we
collect a warning in :attr:`Config.warnings` instead; wrong value types
are :class:`ConfigError`, naming the file and the key.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import toml
import toml.encoder

from cdtwist.plugin import Registration, Registry

__all__ = [
    "CgroupConfig",
    "Config",
    "ConfigError",
    "DebugConfig",
    "GRPCConfig",
    "MetricsConfig",
    "Overrides",
    "ProxyPlugin",
    "StreamProcessor",
    "TTRPCConfig",
    "default_toml",
    "dump_toml",
    "load",
    "parse_duration",
    "parse_duration_ns",
]

DEFAULT_ROOT = "/var/lib/containerd"
DEFAULT_STATE = "/run/containerd"
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_CONFIG_DIR = "/etc/containerd"
DEFAULT_MAX_MSG_SIZE = 16 << 20

#: what ``timeout.Set`` registers in containerd 1.6 (``containerd config default``).
DEFAULT_TIMEOUTS: dict[str, str] = {
    "io.containerd.timeout.bolt.open": "0s",
    "io.containerd.timeout.shim.cleanup": "5s",
    "io.containerd.timeout.shim.load": "5s",
    "io.containerd.timeout.shim.shutdown": "3s",
    "io.containerd.timeout.task.state": "2s",
}

#: logrus level names accepted by ``--log-level`` and ``[debug] level``.
LOG_LEVELS = ("panic", "fatal", "error", "warn", "warning", "info", "debug", "trace")
LOG_FORMATS = ("", "text", "json")

#: label used in messages for values nobody wrote in a file.
DEFAULTS_SOURCE = "<defaults>"
FLAGS_SOURCE = "<command line>"


class ConfigError(Exception):
    """A config that cannot be used; the message names the file and the key."""

    def __init__(self, message: str, file: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.file = file
        self.key = key


# --- the daemon's own settings ----------------------------------------------


def _skip() -> dict[str, Any]:
    """Field metadata for attributes that are not TOML keys."""
    return {"toml": None}


@dataclass
class GRPCConfig:
    address: str = DEFAULT_ADDRESS
    tcp_address: str = ""
    tcp_tls_ca: str = ""
    tcp_tls_cert: str = ""
    tcp_tls_key: str = ""
    uid: int = 0
    gid: int = 0
    max_recv_message_size: int = DEFAULT_MAX_MSG_SIZE
    max_send_message_size: int = DEFAULT_MAX_MSG_SIZE


@dataclass
class TTRPCConfig:
    address: str = ""
    uid: int = 0
    gid: int = 0


@dataclass
class DebugConfig:
    address: str = ""
    uid: int = 0
    gid: int = 0
    level: str = ""
    format: str = ""


@dataclass
class MetricsConfig:
    address: str = ""
    grpc_histogram: bool = False


@dataclass
class CgroupConfig:
    path: str = ""


@dataclass
class ProxyPlugin:
    type: str = ""
    address: str = ""


@dataclass
class StreamProcessor:
    accepts: list[str] = field(default_factory=list)
    returns: str = ""
    path: str = ""
    args: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)


def _default_stream_processors() -> dict[str, StreamProcessor]:
    """containerd's built-in ocicrypt decoders (``streamProcessors()`` in command/config.go)."""
    base = "io.containerd.ocicrypt.decoder.v1"
    args = ["--decryption-keys-path", os.path.join(DEFAULT_CONFIG_DIR, "ocicrypt", "keys")]
    keyprovider = os.path.join(DEFAULT_CONFIG_DIR, "ocicrypt", "ocicrypt_keyprovider.conf")
    env = ["OCICRYPT_KEYPROVIDER_CONFIG=" + keyprovider]
    return {
        base + ".tar.gzip": StreamProcessor(
            accepts=["application/vnd.oci.image.layer.v1.tar+gzip+encrypted"],
            returns="application/vnd.oci.image.layer.v1.tar+gzip",
            path="ctd-decoder",
            args=list(args),
            env=list(env),
        ),
        base + ".tar": StreamProcessor(
            accepts=["application/vnd.oci.image.layer.v1.tar+encrypted"],
            returns="application/vnd.oci.image.layer.v1.tar",
            path="ctd-decoder",
            args=list(args),
            env=list(env),
        ),
    }


@dataclass
class Overrides:
    """Command-line flags that win over the file (containerd's ``applyFlags``)."""

    address: str | None = None
    root: str | None = None
    state: str | None = None
    log_level: str | None = None


@dataclass
class Config:
    """containerd's server config; ``plugins`` keeps the raw per-plugin tables.

    Equality ignores ``imports`` (after :func:`load` it lists the files
    read, as containerd rewrites it), ``warnings`` and ``origins``: they
    say where the settings came from, not what they are.
    """

    version: int = 2
    root: str = DEFAULT_ROOT
    state: str = DEFAULT_STATE
    temp: str = ""
    plugin_dir: str = ""
    grpc: GRPCConfig = field(default_factory=GRPCConfig)
    ttrpc: TTRPCConfig = field(default_factory=TTRPCConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    disabled_plugins: list[str] = field(default_factory=list)
    required_plugins: list[str] = field(default_factory=list)
    oom_score: int = 0
    cgroup: CgroupConfig = field(default_factory=CgroupConfig)
    proxy_plugins: dict[str, ProxyPlugin] = field(default_factory=dict)
    timeouts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_TIMEOUTS))
    imports: list[str] = field(default_factory=list, compare=False)
    stream_processors: dict[str, StreamProcessor] = field(default_factory=_default_stream_processors)
    plugins: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: human-readable notes about ignored keys and sections (file and key named).
    warnings: list[str] = field(default_factory=list, compare=False, repr=False, metadata=_skip())
    #: key path (as in messages, e.g. ``grpc.uid``, ``plugins."<uri>"``) -> file it came from.
    origins: dict[str, str] = field(default_factory=dict, compare=False, repr=False, metadata=_skip())

    @property
    def is_v1(self) -> bool:
        """Version 1 files name plugins by id, version 2 by URI."""
        return self.version < 2

    def section_key(self, reg: Registration) -> str:
        """The ``plugins`` key for ``reg`` as containerd's ``Config.Decode`` looks it up."""
        return reg.id if self.is_v1 else reg.uri

    def is_disabled(self, reg: Registration) -> bool:
        """containerd's V1/V2 ``DisabledFilter``: by id in version 1, by URI otherwise."""
        return self.section_key(reg) in self.disabled_plugins

    def is_required(self, reg: Registration) -> bool:
        return self.section_key(reg) in self.required_plugins

    def origin(self, key: str) -> str:
        return self.origins.get(key, DEFAULTS_SOURCE)

    def plugin_config(self, reg: Registration) -> object:
        """``reg.config`` filled from its ``[plugins]`` section, defaults for the rest.

        Builds a fresh instance on every call so a plugin may keep and
        mutate what it gets.  Unknown keys become warnings.
        """
        if reg.config is None:
            return None
        if not dataclasses.is_dataclass(reg.config):
            raise TypeError(f"plugin {reg.uri}: config must be a dataclass type, not {reg.config!r}")
        key = self.section_key(reg)
        base = _fresh(reg.config)
        raw = self.plugins.get(key)
        if raw is None:
            return base
        path = _join("plugins", key)
        ctx = _Ctx(file=self.origin(path), warnings=self.warnings, zero=False)
        return _decode(reg.config, raw, base, path, ctx)

    def unknown_plugin_sections(self, registry: Registry) -> list[str]:
        """The ``[plugins]`` keys no registration looks up (URIs in v2, ids in v1)."""
        keys = {self.section_key(reg) for reg in registry}
        return [key for key in self.plugins if key not in keys]

    def plugin_section_warnings(self, registry: Registry) -> list[str]:
        """Ready-to-log warnings, naming the file, for sections nothing will read.

        Besides :meth:`unknown_plugin_sections` this reports sections for
        plugins that take no configuration (containerd ignores them silently).
        """
        by_key: dict[str, list[Registration]] = {}
        for reg in registry:
            by_key.setdefault(self.section_key(reg), []).append(reg)
        out = []
        for key in self.plugins:
            path = _join("plugins", key)
            regs = by_key.get(key)
            if not regs:
                what = "plugin id" if self.is_v1 else "plugin"
                hint = ""
                if self.is_v1 and _looks_like_uri(key):
                    hint = " (version 1 configs name plugins by id; set version = 2 to use URIs)"
                out.append(f"{self.origin(path)}: {path}: no such {what}, section ignored{hint}")
            elif all(reg.config is None for reg in regs):
                out.append(f"{self.origin(path)}: {path}: plugin takes no configuration, section ignored")
        return out


# --- durations ---------------------------------------------------------------

_UNITS: dict[str, int] = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign
    "\u03bcs": 1_000,  # Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_MAX_NS = 1 << 63


def _is_digit(c: str) -> bool:
    return "0" <= c <= "9"


def parse_duration_ns(s: str) -> int:
    """Go's ``time.ParseDuration`` in integer nanoseconds, same rounding and errors."""
    if not isinstance(s, str):
        raise ValueError(f"time: invalid duration {s!r}")
    orig = s
    invalid = ValueError(f"time: invalid duration {json.dumps(orig, ensure_ascii=False)}")
    neg = False
    if s and s[0] in "-+":
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise invalid
    total = 0
    while s:
        if not (s[0] == "." or _is_digit(s[0])):
            raise invalid
        i = 0
        while i < len(s) and _is_digit(s[i]):
            i += 1
        whole = int(s[:i]) if i else 0
        pre = i != 0
        if whole > _MAX_NS:
            raise invalid
        s = s[i:]
        frac, scale, post = 0, 1.0, False
        if s and s[0] == ".":
            s = s[1:]
            i, overflow = 0, False
            while i < len(s) and _is_digit(s[i]):
                if not overflow:
                    if frac > (_MAX_NS - 1) // 10:
                        overflow = True
                    else:
                        y = frac * 10 + int(s[i])
                        if y > _MAX_NS:
                            overflow = True
                        else:
                            frac = y
                            scale *= 10
                i += 1
            post = i != 0
            s = s[i:]
        if not pre and not post:
            raise invalid
        i = 0
        while i < len(s) and not (s[i] == "." or _is_digit(s[i])):
            i += 1
        if i == 0:
            raise ValueError(f"time: missing unit in duration {json.dumps(orig, ensure_ascii=False)}")
        unit_name, s = s[:i], s[i:]
        unit = _UNITS.get(unit_name)
        if unit is None:
            raise ValueError(
                f"time: unknown unit {json.dumps(unit_name, ensure_ascii=False)} "
                f"in duration {json.dumps(orig, ensure_ascii=False)}"
            )
        if whole > _MAX_NS // unit:
            raise invalid
        whole *= unit
        if frac > 0:
            whole += int(float(frac) * (float(unit) / scale))
            if whole > _MAX_NS:
                raise invalid
        total += whole
        if total > _MAX_NS:
            raise invalid
    if neg:
        return -total
    if total > _MAX_NS - 1:
        raise invalid
    return total


def parse_duration(s: str) -> float:
    """A Go duration (``"1m30s"``, ``"100ms"``, ``"-1.5h"``) in seconds; ValueError on garbage."""
    return parse_duration_ns(s) / 1e9


# --- typed decoding ------------------------------------------------------------


@dataclass
class _Ctx:
    """Where we are decoding: the file for messages, where warnings go, zero or default bases."""

    file: str
    warnings: list[str]
    #: True decodes like Go's Unmarshal into a zero struct (per-file top level);
    #: False starts new elements from the dataclass defaults (plugin configs).
    zero: bool


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _join(prefix: str, key: str) -> str:
    """``prefix.key`` with ``key`` quoted as TOML would need it."""
    k = key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)
    return f"{prefix}.{k}" if prefix else k


def _looks_like_uri(key: str) -> bool:
    """containerd's ``ValidateV2`` test: at least four dot-separated parts."""
    return len(key.split(".")) >= 4


def _show(value: Any) -> str:
    """A short rendering of a TOML value for messages."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    iso = getattr(value, "isoformat", None)
    return f"a date/time ({iso()})" if iso else type(value).__name__


_hints_cache: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _hints_cache.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        _hints_cache[cls] = hints
    return hints


def _toml_fields(cls: type) -> list[tuple[str, dataclasses.Field[Any], Any]]:
    """(TOML key, field, type) for the fields a file may set."""
    hints = _hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        name = f.metadata.get("toml", f.name)
        if name is None:
            continue
        out.append((name, f, hints[f.name]))
    return out


def _is_union(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    return origin is Union or origin is types.UnionType


def _expected(tp: Any) -> str:
    """How a type is named in 'expected ...' messages."""
    if tp is str:
        return "a string"
    if tp is bool:
        return "a boolean"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    origin = typing.get_origin(tp) or tp
    if origin in (list, tuple):
        return "an array"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a table"
    if _is_union(tp):
        return " or ".join(_expected(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(_show(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _zero(tp: Any) -> Any:
    """Go's zero value for a field type (what Unmarshal starts from)."""
    if tp in (str,):
        return ""
    if tp is bool:
        return False
    if tp is int:
        return 0
    if tp is float:
        return 0.0
    origin = typing.get_origin(tp) or tp
    if origin is list:
        return []
    if origin is tuple:
        return ()
    if origin is dict:
        return {}
    if dataclasses.is_dataclass(tp):
        return _zero_instance(tp)
    return None


def _zero_instance(cls: type) -> Any:
    return cls(**{f.name: _zero(tp) for _, f, tp in _toml_fields(cls)})


def _fresh(cls: type) -> Any:
    """``cls()``, with zero values for fields that have no default."""
    kwargs = {}
    for _, f, tp in _toml_fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            kwargs[f.name] = _zero(tp)
    return cls(**kwargs)


def _is_zero(value: Any) -> bool:
    """mergo's ``isEmptyValue`` for the scalars we merge."""
    return value is None or value == "" or value is False or (type(value) in (int, float) and value == 0)


def _type_error(ctx: _Ctx, path: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{ctx.file}: {path}: expected {_expected(tp)}, got {_show(value)}", ctx.file, path)


def _decode(tp: Any, raw: Any, base: Any, path: str, ctx: _Ctx) -> Any:
    """Check ``raw`` (a value from the toml parser) against ``tp`` and build the typed value.

    Nested dataclasses start from ``base`` (Go decodes into the existing
    struct); maps and arrays are replaced whole, as go-toml does.
    """
    if tp is Any or tp is object:
        return copy.deepcopy(raw)
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _decode(args[0], raw, base, path, ctx)
        for arg in args:
            try:
                fits = isinstance(arg, type) and isinstance(base, arg)
                return _decode(arg, raw, base if fits else None, path, ctx)
            except ConfigError:
                continue
        raise _type_error(ctx, path, tp, raw)
    origin = typing.get_origin(tp)
    if origin is Literal:
        for choice in typing.get_args(tp):
            if raw == choice and type(raw) is type(choice):
                return raw
        raise _type_error(ctx, path, tp, raw)
    if tp is str:
        if not isinstance(raw, str):
            raise _type_error(ctx, path, tp, raw)
        return raw
    if tp is bool:
        if not isinstance(raw, bool):
            raise _type_error(ctx, path, tp, raw)
        return raw
    if tp is int:
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise _type_error(ctx, path, tp, raw)
        return raw
    if tp is float:
        if not isinstance(raw, (int, float)) or isinstance(raw, bool):
            raise _type_error(ctx, path, tp, raw)
        return float(raw)
    if dataclasses.is_dataclass(tp):
        return _decode_dataclass(tp, raw, base, path, ctx)
    container = origin or tp
    if container in (list, tuple):
        if not isinstance(raw, list):
            raise _type_error(ctx, path, tp, raw)
        args = typing.get_args(tp)
        if container is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if args and len(args) != len(raw):
                raise ConfigError(
                    f"{ctx.file}: {path}: expected an array of {len(args)} items, got {len(raw)}",
                    ctx.file,
                    path,
                )
            item_types = list(args) if args else [Any] * len(raw)
        else:
            item_types = [args[0] if args else Any] * len(raw)
        pairs = enumerate(zip(item_types, raw, strict=True))
        items = [_decode(t, v, None, f"{path}[{i}]", ctx) for i, (t, v) in pairs]
        return tuple(items) if container is tuple else items
    if container is dict:
        if not isinstance(raw, dict):
            raise _type_error(ctx, path, tp, raw)
        args = typing.get_args(tp)
        value_type = args[1] if len(args) == 2 else Any
        return {str(k): _decode(value_type, v, None, _join(path, str(k)), ctx) for k, v in raw.items()}
    raise TypeError(f"{path}: unsupported config field type {tp!r}")


def _decode_dataclass(cls: type, raw: Any, base: Any, path: str, ctx: _Ctx) -> Any:
    if not isinstance(raw, dict):
        raise _type_error(ctx, path, cls, raw)
    if not isinstance(base, cls):
        base = _zero_instance(cls) if ctx.zero else _fresh(cls)
    known = {name: (f, tp) for name, f, tp in _toml_fields(cls)}
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        sub = _join(path, key)
        if key not in known:
            what = "section" if isinstance(value, dict) else "key"
            _warn(ctx.warnings, f"{ctx.file}: {sub}: unknown {what}, ignored")
            continue
        f, tp = known[key]
        changes[f.name] = _decode(tp, value, getattr(base, f.name), sub, ctx)
    if not changes:
        return copy.deepcopy(base)
    try:
        return dataclasses.replace(copy.deepcopy(base), **changes)
    except (ValueError, TypeError) as e:
        # a __post_init__ refusing the values
        where = path or "(top level)"
        raise ConfigError(f"{ctx.file}: {where}: {e}", ctx.file, path)


def _warn(warnings: list[str], message: str) -> None:
    if message not in warnings:
        warnings.append(message)


def _encode(value: Any) -> Any:
    """A typed value as plain TOML data: tables with sorted keys, ``None`` left out."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for name, f, _ in sorted(_toml_fields(type(value)), key=lambda t: t[0]):
            v = getattr(value, f.name)
            if v is not None:
                out[name] = _encode(v)
        return out
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: str(kv[0]))
        return {str(k): _encode(v) for k, v in items if v is not None}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


# --- loading -------------------------------------------------------------------


def _read(path: str, importer: str | None = None) -> dict[str, Any]:
    """Parse one file; every failure is a ConfigError naming it (or the file importing it)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        reason = e.strerror or str(e)
        if importer is not None:
            raise ConfigError(f"{importer}: imports: cannot read {path}: {reason}", importer, "imports")
        raise ConfigError(f"{path}: cannot read: {reason}", path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 (byte {e.start})", path)
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return toml.loads(text)
    except toml.TomlDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno}: invalid TOML: {e.msg}", path)
    except Exception as e:  # the toml package has parser bugs that raise other types
        raise ConfigError(f"{path}: invalid TOML: {e}", path)


def _decode_file(path: str, raw: dict[str, Any], warnings: list[str]) -> Config:
    """One file as Go's Unmarshal into an empty Config: zero values where keys are missing."""
    ctx = _Ctx(file=path, warnings=warnings, zero=True)
    return _decode(Config, raw, _zero_instance(Config), "", ctx)


def _merge(to: Any, frm: Any, prefix: str, file: str, origins: dict[str, str]) -> None:
    """containerd's ``mergeConfig``: mergo.Merge(WithOverride, WithAppendSlice), then whole map values.

    Non-zero scalars overwrite, zero ones never do; arrays are appended;
    maps (plugins, proxy_plugins, timeouts, stream_processors) are merged
    by key with each value replaced whole.
    """
    for name, f, _ in _toml_fields(type(to)):
        path = _join(prefix, name)
        new = getattr(frm, f.name)
        old = getattr(to, f.name)
        if dataclasses.is_dataclass(new):
            _merge(old, new, path, file, origins)
        elif isinstance(new, list):
            for i in range(len(old), len(old) + len(new)):
                origins[f"{path}[{i}]"] = file
            old.extend(new)
        elif isinstance(new, dict):
            for k, v in new.items():
                old[k] = v
                origins[_join(path, k)] = file
        elif not _is_zero(new):
            setattr(to, f.name, new)
            origins[path] = file


def _resolve_imports(parent: str, imports: list[str]) -> list[str]:
    """Import entries to paths: relative to the including file, ``*`` entries globbed (sorted)."""
    base = os.path.dirname(parent)
    out: list[str] = []
    for entry in imports:
        p = os.path.normpath(os.path.join(base, entry))  # join keeps an absolute entry as is
        if "*" in entry:
            out.extend(sorted(glob.glob(p, include_hidden=True)))
        else:
            out.append(p)
    return out


def load(path: str | None, overrides: Overrides | None = None) -> Config:
    """The daemon config: defaults, then ``path`` and its imports, then ``overrides``.

    ``path=None`` means no file (containerd without a config.toml).
    """
    config = Config()
    if path is not None:
        config.version = 1  # containerd's default; a file without `version` is v1
        _load_files(config, path)
    _apply_overrides(config, overrides or Overrides())
    _validate(config, path)
    if not config.ttrpc.address:
        # containerd derives the ttrpc socket from the grpc one (command/main.go)
        config.ttrpc.address = f"{config.grpc.address}.ttrpc"
        config.ttrpc.uid = config.grpc.uid
        config.ttrpc.gid = config.grpc.gid
    return config


def _load_files(config: Config, path: str) -> None:
    """containerd's ``LoadConfig``: breadth-first over imports, each file once."""
    seen: set[str] = set()
    loaded: list[str] = []
    pending: list[tuple[str, str | None]] = [(path, None)]
    while pending:
        current, importer = pending.pop(0)
        key = os.path.realpath(current)
        if key in seen:
            continue
        raw = _read(current, importer)
        part = _decode_file(current, raw, config.warnings)
        _merge(config, part, "", current, config.origins)
        seen.add(key)
        loaded.append(current)
        pending.extend((p, current) for p in _resolve_imports(current, part.imports))
    config.imports = loaded


def _apply_overrides(config: Config, overrides: Overrides) -> None:
    """containerd's ``applyFlags``: a flag wins when it is not empty."""
    for value, obj, attr, key in (
        (overrides.root, config, "root", "root"),
        (overrides.state, config, "state", "state"),
        (overrides.address, config.grpc, "address", "grpc.address"),
        (overrides.log_level, config.debug, "level", "debug.level"),
    ):
        if value:
            setattr(obj, attr, value)
            config.origins[key] = FLAGS_SOURCE


def _validate(config: Config, path: str | None) -> None:
    """What containerd checks after loading (``ValidateV2``) and at startup, as ConfigErrors."""
    main = path or DEFAULTS_SOURCE
    if config.version < 1:
        src = config.origin("version")
        raise ConfigError(f"{src}: version: expected 1 or 2, got {config.version}", src, "version")
    if config.is_v1:
        if path is not None:
            _warn(
                config.warnings,
                f"{main}: containerd config version `{config.version}` has been deprecated and will be "
                "removed in containerd v2.0, please switch to version `2`",
            )
    else:
        for name in ("disabled_plugins", "required_plugins"):
            for i, uri in enumerate(getattr(config, name)):
                if not _looks_like_uri(uri):
                    src = config.origin(f"{name}[{i}]")
                    raise ConfigError(
                        f"{src}: {name}: invalid plugin URI {_show(uri)}, expected io.containerd.x.vN.id "
                        f"in a version {config.version} config",
                        src,
                        name,
                    )
        for key in list(config.plugins):
            if not _looks_like_uri(key):
                sub = _join("plugins", key)
                _warn(
                    config.warnings,
                    f"{config.origin(sub)}: {sub}: not a plugin URI (io.containerd.x.vN.id) in a version "
                    f"{config.version} config, section ignored",
                )
                del config.plugins[key]
    for key, value in config.timeouts.items():
        sub = _join("timeouts", key)
        try:
            parse_duration_ns(value)
        except ValueError as e:
            src = config.origin(sub)
            raise ConfigError(f"{src}: {sub}: {e}", src, sub)
    level = config.debug.level
    if level and level.lower() not in LOG_LEVELS:
        src = config.origin("debug.level")
        raise ConfigError(
            f"{src}: debug.level: not a valid log level {_show(level)} (one of {', '.join(LOG_LEVELS)})",
            src,
            "debug.level",
        )
    if config.debug.format not in LOG_FORMATS:
        src = config.origin("debug.format")
        raise ConfigError(
            f"{src}: debug.format: unknown log format {_show(config.debug.format)} (text or json)",
            src,
            "debug.format",
        )


# --- writing -------------------------------------------------------------------


def _dump_str(s: str) -> str:
    """A TOML basic string; toml 0.10.2 mangles backslashes and control characters."""
    out = []
    for c in s:
        if c == '"':
            out.append('\\"')
        elif c == "\\":
            out.append("\\\\")
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c == "\r":
            out.append("\\r")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


class _Encoder(toml.encoder.TomlEncoder):  # type: ignore[misc]
    """The toml package's encoder with correct string escaping."""

    def __init__(self) -> None:
        super().__init__(dict)
        self.dump_funcs[str] = _dump_str


def _same(a: Any, b: Any) -> bool:
    """Deep equality where NaN equals NaN (for checking our own output)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _dumps(data: dict[str, Any]) -> str:
    text = toml.dumps(data, encoder=_Encoder())
    try:
        ok = _same(toml.loads(text), data)
    except Exception:
        ok = False
    if not ok:
        raise ValueError("cannot write this configuration as TOML (keys the toml package cannot quote?)")
    return text


def _render(config: Config, registry: Registry) -> dict[str, Any]:
    """``containerd config dump``'s view: version 2, plugin sections by URI with defaults filled in."""
    data: dict[str, Any] = {}
    for name, f, _ in _toml_fields(Config):
        if name != "plugins":
            data[name] = _encode(getattr(config, f.name))
    data["version"] = max(config.version, 2)
    # the files read are already merged in; listing them would import them twice
    data["imports"] = []
    if config.is_v1:
        by_id: dict[str, list[str]] = {}
        for reg in registry:
            by_id.setdefault(reg.id, []).append(reg.uri)
        # a disabled id nothing has is a no-op; an unknown required id must stay and fail
        data["disabled_plugins"] = [u for i in config.disabled_plugins for u in by_id.get(i, [])]
        data["required_plugins"] = [u for i in config.required_plugins for u in by_id.get(i, [i])]
    plugins = {}
    for reg in sorted(registry, key=lambda r: r.uri):
        if reg.config is not None:
            plugins[reg.uri] = _encode(config.plugin_config(reg))
    data["plugins"] = plugins
    return dict(sorted(data.items()))


def default_toml(registry: Registry) -> str:
    """``containerd config default``: every key with its default, every plugin's defaults."""
    return _dumps(_render(Config(), registry))


def dump_toml(config: Config, registry: Registry) -> str:
    """``containerd config dump``: the effective config, loadable on its own."""
    header = ""
    if config.imports:
        names = [p.encode("unicode_escape").decode() for p in config.imports]
        header = "".join(f"# loaded from {name}\n" for name in names) + "\n"
    return header + _dumps(_render(config, registry))
