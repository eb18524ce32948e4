"""The metadata database: what containerd keeps in bolt, kept in sqlite."""
