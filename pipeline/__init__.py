"""facd-pipeline: distil, export, quantize and verify small super-resolution students."""

__version__ = "0.1.0"
