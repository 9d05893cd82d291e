"""What the command-line entry points share: argument parsing, config loading, multi-host
start-up and the one path that reports user errors (`runner.run_command`)."""
