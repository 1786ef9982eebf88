"""Data: synthetic scans with ground truth, validation, splits."""
