"""Supported commands beside the training path: python -m tools.<name> from the repository root."""
