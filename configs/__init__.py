"""Experiment configs (ml_collections): one file per experiment, all built on `configs.base`."""
