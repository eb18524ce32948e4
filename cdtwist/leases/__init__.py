"""Leases: holding resources against garbage collection (containerd's ``leases`` and ``services/leases``)."""
