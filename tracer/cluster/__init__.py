"""Cluster metadata: the inventory model, the API server connection, listing and watching."""
