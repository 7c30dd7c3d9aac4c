"""Datasets: the crossMoDA folder layout (:mod:`.crossmoda`: one parser, a simulated data set)
and the two-contrast simulator (:mod:`.phantom`) with ground-truth renders."""
