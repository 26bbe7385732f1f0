"""Videos in and out: files and frame folders read, resized to multiples of 8 and written; the synthetic
camera pan with its exact flow (a known-answer clip). Imports `stem.core` and `stem.diffusion.device`."""
