"""Datasets: the two-contrast simulator (:mod:`.phantom`) with ground-truth renders."""
