"""`python -m tracer.cli`: the podtrace command line."""

from tracer.cli.main import main

main()
