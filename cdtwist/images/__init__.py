"""Images: named targets in the content store (containerd's ``images`` and ``services/images``)."""
