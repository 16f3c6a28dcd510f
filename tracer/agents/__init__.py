"""Agents: the per-node tracer process, its wire protocol, the coordinator and the transports that reach it."""
