"""Batch service providers: one module each (``local``, ``aws``, ``azure``).

A provider is a small `cloudexec.Provider` subclass plus its status table and
a thin `BatchExecutor` subclass that builds it from user-facing arguments.
"""
