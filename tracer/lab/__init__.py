"""`podtrace lab`: a simulated multi-node Kubernetes cluster made of network namespaces.

Planning (pure): model.py (config, names, plan records), flannel.py and cilium.py (what each
CNI flavour is made of), kubeproxy.py (Service rules), topology.py (the plan, one import for
all of these), statusdoc.py and apiobjects.py (the documents a plan is described by).
Making: build.py (up/down), shell.py (batches, sysctls), processes.py (the responders),
guard.py (lock, signals). responder.py answers in every pod; scenarios/ breaks and fixes the
lab; cli.py is the `podtrace lab` command group. The lab depends on the product, never the
reverse: no product module imports this package (the `lab` command aside).
"""
