"""Helpers every part uses: atomic writes and positional I/O, fsspec paths, system probes, lazy exports."""

