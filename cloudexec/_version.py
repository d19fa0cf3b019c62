"""The cloudexec version (kept apart so the runner can read it cheaply)."""

__version__ = "0.1.0"
