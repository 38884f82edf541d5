"""Evaluation: any runner over a dataset, scoring folders, verification of every backend, the reports."""
