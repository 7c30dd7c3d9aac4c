"""Small deterministic test data shared by the test modules."""

import numpy as np


def textured_slice(shape=(48, 48), seed=0) -> np.ndarray:
    """A smooth random texture with a bright blob: enough structure to learn in seconds."""
    rng = np.random.default_rng(seed)
    from scipy.ndimage import gaussian_filter

    image = gaussian_filter(rng.normal(size=shape), 2.0) * 40 + 100
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image += 60 * np.exp(-((yy - shape[0] * 0.4) ** 2 + (xx - shape[1] * 0.6) ** 2) / (2 * (shape[0] / 8) ** 2))
    return image.astype(np.float32)
