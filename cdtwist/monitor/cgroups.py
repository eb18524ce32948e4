# -*- test-case-name: tests.test_tasks_service -*-
"""``io.containerd.monitor.v1.cgroups``: the task monitor the tasks service reports to.

In containerd 1.6 this monitor feeds per-task cgroup metrics to Prometheus
and, for runtime v1 tasks only, watches the memory cgroup for OOM kills.
v2 shims watch OOM themselves and publish ``/tasks/oom`` through the
daemon's ttrpc ``Events/Forward``, which the exchange republishes, so for
the v2 runtime the monitor only has to know which tasks exist: it keeps
that list (with the labels the tasks service gives, ``runtime=<name>``).
Per-task Prometheus metrics are not exported (``no_prometheus`` is
accepted for config compatibility).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cdtwist.plugin import EVENT, MONITOR, Registration, register

if TYPE_CHECKING:
    from cdtwist.plugin.context import InitContext


@dataclass
class CgroupsConfig:
    """``[plugins."io.containerd.monitor.v1.cgroups"]``."""

    no_prometheus: bool = False


class TaskMonitor:
    """containerd's ``runtime.TaskMonitor``: ``monitor`` a task when created, ``unmonitor`` when deleted.

    (containerd's ``Stop`` is ``unmonitor`` here: ``stop`` is the plugin lifecycle hook.)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[tuple[str, str], Mapping[str, str]] = {}

    def monitor(self, task: Any, labels: Mapping[str, str] | None = None) -> None:
        with self._lock:
            self._tasks[(task.namespace, task.id)] = dict(labels or {})

    def unmonitor(self, task: Any) -> None:
        with self._lock:
            self._tasks.pop((task.namespace, task.id), None)

    def monitored(self) -> dict[tuple[str, str], Mapping[str, str]]:
        with self._lock:
            return dict(self._tasks)


def _init(ic: InitContext) -> TaskMonitor:
    from cdtwist.snapshots import default_platform

    ic.meta.platforms.append(default_platform())
    return TaskMonitor()


register(Registration(type=MONITOR, id="cgroups", requires=(EVENT,), config=CgroupsConfig, init=_init))
