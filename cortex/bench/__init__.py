"""Benchmarks run by `cortex bench NAME`; each module defines `register(subparsers)`."""
