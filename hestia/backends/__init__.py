"""Backends: what runs a service (Docker today). See base.py for the protocol."""
