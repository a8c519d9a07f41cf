"""Cortex: decentralized LLM inference driven by signed events."""

__version__ = "0.1.0"
