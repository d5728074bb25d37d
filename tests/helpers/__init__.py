"""Shared test helpers: tiny models and configs, pipeline fixtures, fake evaluation data, clusters."""
