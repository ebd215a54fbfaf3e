"""Compact model definitions for the fast runtime."""
