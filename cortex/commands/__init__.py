"""Subcommands of `cortex`: each module defines `register(subparsers)`."""
