"""singan-insert: realistic tumor insertion with a one-shot SinGAN harmonizer."""

__version__ = "0.1.0"
