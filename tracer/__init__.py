"""podtrace: follow packets between Kubernetes pods across nodes, hop by hop, with eBPF."""

__version__ = "0.1.0"
