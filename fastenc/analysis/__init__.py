"""Embedding analysis and figures."""
