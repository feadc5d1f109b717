"""Backends run one job's inference on this machine. One file per backend, each a `Backend`."""
