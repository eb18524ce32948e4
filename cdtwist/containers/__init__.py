"""Containers: metadata records a task is started from (containerd's ``containers`` and ``services/containers``)."""
