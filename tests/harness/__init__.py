"""Test harness: the real test model in plain transformers, and the multi-agent workflow."""
