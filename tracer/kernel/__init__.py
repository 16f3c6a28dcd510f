"""The kernel side: BTF, tracepoint formats, the event record, program build, hook catalog, session, ring reader, tc."""
