"""`podtrace lab`: a simulated multi-node Kubernetes cluster made of network namespaces.

topology.py plans it (pure), build.py makes and removes it, responder.py answers in every
pod, cli.py is the `podtrace lab` command group.
"""
