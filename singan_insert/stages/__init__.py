"""Thin wrappers for the other stages of the method: CycleGAN, pix2pix and nnU-Net."""
