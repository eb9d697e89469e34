"""Subcommands of the ``agent-v2`` command line, one module each."""
