"""Evaluation: metrics, insertion baselines, the Fig.-2 experiment, the demo and figures."""
