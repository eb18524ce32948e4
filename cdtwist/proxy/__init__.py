"""Out-of-process plugins, both ways (containerd's ``[proxy_plugins]``).

* :mod:`.plugins` turns ``[proxy_plugins.<name>]`` into snapshotter and
  content plugins whose calls go over gRPC to another process
  (:mod:`.snapshotter`, :mod:`.content`, over a :mod:`.channel`).
* :mod:`.serve` is ``cdtwist serve-plugin``: one built-in snapshotter or
  the content store served on a socket, without namespaces, for another
  daemon (cdtwist or containerd) to use as its proxy plugin.
"""
