from tracer.cli.main import main

main()
