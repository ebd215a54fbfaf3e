"""Ops: the only package that touches kernels/ and the native extension."""
from . import backend
from .accept import greedy_accept

__all__ = ["backend", "greedy_accept"]
