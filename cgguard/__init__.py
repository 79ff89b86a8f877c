"""cgguard: find fork bombs and runaway task growth in cgroup-v2 subtrees and remove them."""

__version__ = "0.1.0"
