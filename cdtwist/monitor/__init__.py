"""Task monitors (containerd's ``io.containerd.monitor.v1`` plugins)."""
