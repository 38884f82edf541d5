"""Runners: one interface (LR uint8 image in, SR uint8 image out) over every way of running a model."""
