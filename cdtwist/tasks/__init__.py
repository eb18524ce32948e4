"""The tasks service: ``containerd.services.tasks.v1.Tasks`` over the v2 runtime."""
