"""Image operations on (H, W) float arrays: preprocessing, windows, robust statistics."""
