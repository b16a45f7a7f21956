"""Glue for training frameworks: each submodule imports its framework, which this package does not need."""
