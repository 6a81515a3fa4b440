"""Shared core of the project: the class table, the project error type and image I/O."""

__version__ = "0.1.0"
