"""One node: network namespaces, node facts for diagnosis, pod discovery, ownership of what podtrace leaves."""
