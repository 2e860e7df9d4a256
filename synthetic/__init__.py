"""Shapes world: a synthetic image/video QA corpus with known ground truth."""
