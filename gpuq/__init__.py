"""gpuq: GPU inference jobs as rows in Postgres.

This package is the part that the worker, the manager, the CLI and the tests share: settings,
connections (with the embedded Postgres default), migrations and the thin client over the SQL functions.
"""

__version__ = "0.1.0"
