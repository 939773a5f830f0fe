"""Tiny apps that the CLI tests run as real worker subprocesses."""
