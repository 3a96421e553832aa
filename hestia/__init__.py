"""Hestia: a personal on-demand service gateway."""

__version__ = "0.1.0"
