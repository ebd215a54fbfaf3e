"""Ops: the only package that touches kernels/ and the native extensions."""
from . import backend
from .tree_ops import greedy_accept, greedy_accept_ref

__all__ = ["backend", "greedy_accept", "greedy_accept_ref"]
