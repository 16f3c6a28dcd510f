"""Cluster metadata: what the cluster holds, where its pods live, how its API is reached."""
