"""The snapshotter registrations: ids, configs, platforms, exports and skip reasons as containerd 1.6.20's."""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import Any

from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SkipTest, TestCase

import cdtwist.snapshots.plugin  # noqa: F401  (registers the snapshotters)
import cdtwist.snapshots.skipped as skipped
from cdtwist.errors import CdtwistError
from cdtwist.plugin import SNAPSHOTTER, SkipPlugin, registry
from cdtwist.plugin.context import InitContext, Meta, Platform, PluginSet
from cdtwist.snapshots import default_platform
from cdtwist.snapshots import overlay as overlay_mod
from cdtwist.snapshots.native import NativeSnapshotter
from cdtwist.snapshots.overlay import OverlaySnapshotter


def _fields(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls)}


class RegistrationTests(TestCase):
    def setUp(self) -> None:
        self.pool = ThreadPool(1, 2, name="test-snapshots-io")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)

    def context(self, plugin_id: str, **config: Any) -> InitContext:
        reg = registry.get(f"{SNAPSHOTTER}.{plugin_id}")
        assert reg is not None and reg.config is not None
        return InitContext(
            registration=reg,
            root=os.path.join(self.base, reg.uri),
            state=os.path.join(self.base, "state", reg.uri),
            config=reg.config(**config),
            meta=Meta(),
            plugins=PluginSet(),
            reactor=reactor,
            io_pool=self.pool,
            daemon_config=None,
        )

    def init(self, ic: InitContext) -> Any:
        try:
            return ic.registration.init(ic)
        except BaseException as e:  # a synchronous init failure, as a failed Deferred would be
            from twisted.internet.defer import fail

            return fail(e)

    def test_order_ids_and_configs(self) -> None:
        """containerd's ids in its order, its config keys and defaults, no requirements.

        The engine modules are imported before :mod:`cdtwist.snapshots.plugin`
        in this process (by other test modules): the order must not depend on it.
        """
        ids = [r.id for r in registry if r.type == SNAPSHOTTER]
        self.assertEqual(ids, ["aufs", "btrfs", "devmapper", "native", "overlayfs", "zfs"])
        configs = {r.id: _fields(r.config) for r in registry if r.type == SNAPSHOTTER}  # type: ignore[arg-type]
        self.assertEqual(
            configs,
            {
                "aufs": {"root_path": ""},
                "btrfs": {"root_path": ""},
                "devmapper": {
                    "root_path": "",
                    "pool_name": "",
                    "base_image_size": "",
                    "async_remove": False,
                    "discard_blocks": False,
                    "fs_type": "",
                    "fs_options": "",
                },
                "native": {"root_path": ""},
                "overlayfs": {"root_path": "", "upperdir_label": False},
                "zfs": {"root_path": ""},
            },
        )
        for r in registry:
            if r.type == SNAPSHOTTER:
                self.assertEqual(r.requires, ())

    def test_default_platform(self) -> None:
        import platform

        self.patch(platform, "machine", lambda: "x86_64")
        self.assertEqual(default_platform(), Platform("linux", "amd64", ""))
        self.patch(platform, "machine", lambda: "aarch64")
        self.assertEqual(default_platform(), Platform("linux", "arm64", "v8"))
        self.patch(platform, "machine", lambda: "armv7l")
        self.assertEqual(default_platform(), Platform("linux", "arm", "v7"))

    async def test_overlayfs(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("requires root")
        ic = self.context("overlayfs", upperdir_label=True)
        sn = await self.init(ic)
        self.assertIsInstance(sn, OverlaySnapshotter)
        self.assertEqual(ic.meta.platforms, [default_platform()])
        self.assertEqual(ic.meta.exports, {"root": ic.root})
        self.assertEqual(sn.root, ic.root)
        self.assertTrue(sn.async_remove, "containerd 1.6's plugin always removes asynchronously")
        self.assertTrue(sn.upperdir_label)
        self.assertEqual(os.listdir(ic.root), ["snapshots"])
        sn.prepare("a", "")
        await sn.stop()
        self.assertRaises(CdtwistError, sn.stat, "a")

    async def test_overlayfs_root_path(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("requires root")
        elsewhere = os.path.join(self.base, "elsewhere")
        ic = self.context("overlayfs", root_path=elsewhere)
        sn = await self.init(ic)
        self.addCleanup(sn.close)
        self.assertEqual((sn.root, ic.meta.exports["root"]), (elsewhere, elsewhere))
        self.assertFalse(sn.upperdir_label)

    async def test_overlayfs_unsupported_skips(self) -> None:
        def unsupported(root: str) -> None:
            raise overlay_mod.OverlayUnsupported("failed to mount overlay: no such device")

        self.patch(overlay_mod, "supported", unsupported)
        ic = self.context("overlayfs")
        e = await self.assertFailure(self.init(ic), SkipPlugin)
        self.assertEqual(str(e), "failed to mount overlay: no such device")
        self.assertEqual(ic.meta.exports, {"root": ic.root})

    async def test_native(self) -> None:
        ic = self.context("native")
        sn = await self.init(ic)
        self.assertIsInstance(sn, NativeSnapshotter)
        self.assertEqual(ic.meta.platforms, [default_platform()])
        self.assertEqual(ic.meta.exports, {}, "containerd 1.6's native exports nothing")
        self.assertEqual(os.listdir(ic.root), ["snapshots"])
        self.assertEqual(stat.S_IMODE(os.stat(ic.root).st_mode), 0o700)
        await sn.stop()

    async def test_native_root_path(self) -> None:
        elsewhere = os.path.join(self.base, "n")
        sn = await self.init(self.context("native", root_path=elsewhere))
        self.addCleanup(sn.close)
        self.assertEqual(sn.root, elsewhere)

    async def test_btrfs(self) -> None:
        ic = self.context("btrfs")
        fstype = skipped.lookup(self.base).fstype
        if fstype == "btrfs":
            raise SkipTest("the test directory is on btrfs")
        e = await self.assertFailure(self.init(ic), SkipPlugin)
        self.assertEqual(
            str(e), f"path {ic.root} ({fstype}) must be a btrfs filesystem to be used with the btrfs snapshotter"
        )
        self.assertEqual(ic.meta.exports, {"root": ic.root})
        self.assertEqual(ic.meta.platforms, [default_platform()])
        self.assertEqual(stat.S_IMODE(os.stat(ic.root).st_mode), 0o700)

    async def test_zfs(self) -> None:
        ic = self.context("zfs")
        e = await self.assertFailure(self.init(ic), SkipPlugin)
        self.assertEqual(str(e), f"path {ic.root} must be a zfs filesystem to be used with the zfs snapshotter")
        self.assertEqual(ic.meta.exports, {"root": ic.root})
        self.assertFalse(os.path.exists(ic.root), "zfs does not create its root")

    async def test_devmapper(self) -> None:
        """Not configured is an error (not a skip) in containerd 1.6."""
        ic = self.context("devmapper")
        e = await self.assertFailure(self.init(ic), CdtwistError)
        self.assertNotIsInstance(e, SkipPlugin)
        self.assertEqual(str(e), "devmapper not configured")
        self.assertEqual(ic.meta.exports, {})
        self.assertEqual(ic.meta.platforms, [default_platform()])
        e = await self.assertFailure(self.init(self.context("devmapper", pool_name="pool")), CdtwistError)
        self.assertIn("not implemented", str(e))

    async def test_aufs_without_modprobe(self) -> None:
        self.patch(skipped.shutil, "which", lambda name: None)
        ic = self.context("aufs")
        e = await self.assertFailure(self.init(ic), SkipPlugin)
        self.assertEqual(
            str(e),
            'aufs is not supported (modprobe aufs failed: exec: "modprobe": executable file not found in $PATH "")',
        )
        self.assertEqual(ic.meta.exports, {"root": ic.root})

    async def test_aufs_modprobe_fails(self) -> None:
        script = os.path.join(self.base, "modprobe")
        with open(script, "w") as f:
            f.write("#!/bin/sh\necho 'modprobe: FATAL: Module aufs not found in directory /lib/modules/x'\nexit 1\n")
        os.chmod(script, 0o755)
        self.patch(skipped.shutil, "which", lambda name: script)
        e = await self.assertFailure(self.init(self.context("aufs")), SkipPlugin)
        self.assertEqual(
            str(e),
            'aufs is not supported (modprobe aufs failed: exit status 1 "modprobe: FATAL: Module aufs not found'
            ' in directory /lib/modules/x\\n")',
        )

    async def test_aufs_module_loaded_but_not_listed(self) -> None:
        if "aufs" in open("/proc/filesystems").read():
            raise SkipTest("aufs is available here")
        script = os.path.join(self.base, "modprobe")
        with open(script, "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        os.chmod(script, 0o755)
        self.patch(skipped.shutil, "which", lambda name: script)
        e = await self.assertFailure(self.init(self.context("aufs")), SkipPlugin)
        self.assertEqual(str(e), "aufs is not supported")
