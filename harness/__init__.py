"""Suites, runner, models, datasets, metrics, records, reports and compare."""
