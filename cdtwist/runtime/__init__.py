"""Runtime v2: shims, bundles and the task manager (containerd's ``runtime/v2``).

:mod:`~cdtwist.runtime.manager` is the ``io.containerd.runtime.v2.task``
plugin; :mod:`~cdtwist.runtime.shim` drives one shim's task API over ttrpc;
:mod:`~cdtwist.runtime.binary` runs shim binaries (``start``/``delete``)
without forking; :mod:`~cdtwist.runtime.bundle` lays out bundles on disk;
:mod:`~cdtwist.runtime.publish` is the ``-publish-binary`` handed to shims.
"""
