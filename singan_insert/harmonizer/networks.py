"""The per-scale generator and patch critic, and the pyramid of generators that runs them.

Both networks are the official SinGAN's: ``num_layers`` 3x3 convolutions (``width`` filters)
with LeakyReLU(0.2), fully convolutional, so a trained pyramid accepts slices of any size.
Two deliberate differences, both for harmonization of batches:

* no BatchNorm. SinGAN trains with a batch of one, so BatchNorm there acts per image; at
  inference on a batch of slices it would either mix slices (train mode) or use running
  statistics that training never matched (eval mode). Without it, a batch gives exactly the
  per-slice result, and the WGAN-GP penalty is well defined per sample (as ConSinGAN does).
* "same" zero padding inside every convolution instead of one zero padding of the input, so
  a slice of any size keeps its size through the pyramid (oneDNN fuses zero padding into the
  convolution; reflection padding cost a separate copy per layer, about a third of the time).

The generator at scale :math:`s` is residual on the upsampled output of the coarser scale:

.. math:: x_s = G_s(\\uparrow x_{s-1} + \\sigma_s z_s) = \\uparrow x_{s-1} + \\tanh(f_s(\\uparrow x_{s-1} + \\sigma_s z_s)),

with :math:`z_s \\sim \\mathcal N(0, 1)` and the noise amplitude :math:`\\sigma_s` set from the
reconstruction error at that scale (see :mod:`singan_insert.harmonizer.training`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from singan_insert.errors import SinganInsertError
from singan_insert.harmonizer.pyramid import resize, resize_source_span


def _conv_stack(in_channels: int, width: int, out_channels: int, num_layers: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(num_layers - 1):
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        channels = width
    layers.append(nn.Conv2d(channels, out_channels, 3, padding=1))
    return nn.Sequential(*layers)


#: Generator architectures (recorded in the model file as ``"arch"``; files without it are
#: ``"singan"``): the official one, and one that also sees the tumor mask as an input channel.
ARCHITECTURES = ("singan", "singan-mask")


class ScaleGenerator(nn.Module):
    """Generator of one scale: adds residual detail to the upsampled coarser image.

    With ``mask_channel`` (architecture ``"singan-mask"``) the body also receives the mask of
    the foreign region (the pasted tumor), so that it can treat that region differently from
    the rest: :math:`x_s = \\uparrow x_{s-1} + \\tanh(f_s([\\uparrow x_{s-1} + \\sigma_s z_s, m_s]))`.
    """

    def __init__(self, channels: int = 1, width: int = 32, num_layers: int = 5, mask_channel: bool = False):
        super().__init__()
        self.mask_channel = bool(mask_channel)
        self.body = _conv_stack(channels + int(self.mask_channel), width, channels, num_layers)
        # Start as the identity (zero residual): a fresh scale then reproduces the upsampled
        # coarser image instead of adding random structure that training must first undo.
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    @property
    def arch(self) -> str:
        return "singan-mask" if self.mask_channel else "singan"

    @property
    def reach(self) -> int:
        """How far (px) an output pixel sees into its input: one pixel per 3x3 convolution."""
        return sum((conv.kernel_size[0] - 1) // 2 * conv.dilation[0]
                   for conv in self.body if isinstance(conv, nn.Conv2d))

    def forward(self, coarse: torch.Tensor, noise: torch.Tensor | float = 0.0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = coarse + noise
        if self.mask_channel:
            mask = torch.zeros_like(coarse[:, :1]) if mask is None else mask.to(coarse.dtype).expand_as(coarse[:, :1])
            x = torch.cat([x, mask], dim=1)
        return coarse + torch.tanh(self.body(x))


def build_generator(arch: str = "singan", width: int = 32, num_layers: int = 5) -> ScaleGenerator:
    """The generator of one scale for an architecture of :data:`ARCHITECTURES`."""
    if arch not in ARCHITECTURES:
        raise SinganInsertError(f"Unknown generator architecture {arch!r}; choose one of {ARCHITECTURES}.")
    return ScaleGenerator(width=int(width), num_layers=int(num_layers), mask_channel=arch == "singan-mask")


class PatchCritic(nn.Module):
    """WGAN critic of one scale: one realism score per receptive-field patch (11x11 px)."""

    def __init__(self, channels: int = 1, width: int = 32, num_layers: int = 5):
        super().__init__()
        self.body = _conv_stack(channels, width, 1, num_layers)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.body(image)


NoiseFn = Callable[[tuple[int, ...]], torch.Tensor]
#: ``(top, bottom, left, right)`` of an image, half-open.
Box = tuple[int, int, int, int]


class GeneratorPyramid(nn.Module):
    """The trained generators of scales ``first_scale .. first_scale + len(generators) - 1``.

    Args:
        generators: one :class:`ScaleGenerator` per trained scale, coarsest first.
        noise_amplitudes: :math:`\\sigma_s` per trained scale.
        first_scale: the pyramid index of ``generators[0]`` (0 when trained from noise).
    """

    def __init__(self, generators: Sequence[ScaleGenerator], noise_amplitudes: Sequence[float], first_scale: int):
        super().__init__()
        if len(generators) != len(noise_amplitudes):
            raise ValueError("one noise amplitude per generator is needed")
        self.generators = nn.ModuleList(generators)
        self.noise_amplitudes = [float(a) for a in noise_amplitudes]
        self.first_scale = int(first_scale)

    def generator(self, scale: int) -> ScaleGenerator:
        return self.generators[scale - self.first_scale]

    def amplitude(self, scale: int) -> float:
        return self.noise_amplitudes[scale - self.first_scale]

    def run(
        self,
        image: torch.Tensor,
        sizes: Sequence[tuple[int, int]],
        start_scale: int,
        stop_scale: int,
        noise: NoiseFn | None,
        mask: torch.Tensor | None = None,
        needed: Box | None = None,
    ) -> torch.Tensor:
        """Run :math:`G_{stop} \\circ \\dots \\circ G_{start}` on ``image`` (already at ``sizes[start]``).

        Args:
            image: ``(B, 1, H, W)`` input of the start scale (the upsampled coarser image).
            sizes: the shape of every scale of this run, indexed by pyramid scale.
            start_scale, stop_scale: first and last scale to run (inclusive).
            noise: returns a standard-normal tensor of the given shape, or ``None`` for no noise
                (reconstruction).
            mask: ``(B, 1, h, w)`` mask of the foreign region at any size, resized to each scale
                for generators that take it (architecture ``"singan-mask"``); ``None``: zeros.
            needed: ``(top, bottom, left, right)``, half-open, of the output at ``stop_scale``
                whose values the caller uses; default: all of it. Each generator then runs on
                the part of its scale that reaches that box (its receptive field and the
                bicubic upsampling's four taps traced back), and outside that part the output
                holds the upsampled coarser image without the generator's residual. Within
                ``needed`` the output is the whole-image run's (up to float rounding): the
                noise is still drawn for the whole image, so that the random stream does not
                depend on the box. A tumor's blend weight covers a fraction of its crop, so
                this saves most of the finest scales' convolutions.
        Returns:
            The output at scale ``stop_scale``.
        """
        boxes = self._boxes(sizes, start_scale, stop_scale, needed)
        x = image
        for scale in range(start_scale, stop_scale + 1):
            upsampled = resize(x, sizes[scale])
            z = 0.0 if noise is None else self.amplitude(scale) * noise(tuple(upsampled.shape))
            generator = self.generator(scale)
            m = None if mask is None or not generator.mask_channel else resize(mask, sizes[scale]).clamp(0, 1)
            box = boxes[scale]
            if box is None:
                x = generator(upsampled, z, m)
                continue
            (top, bottom, left, right), (in_top, in_bottom, in_left, in_right) = box
            cut = (..., slice(top, bottom), slice(left, right))
            part = generator(upsampled[cut], z if isinstance(z, float) else z[cut], None if m is None else m[cut])
            # Only the needed box is exact: within reach of a cut edge inside the image, the
            # convolutions' zero padding stood in for pixels the whole-image run sees.
            x = upsampled.clone()
            x[..., in_top:in_bottom, in_left:in_right] = \
                part[..., in_top - top:in_bottom - top, in_left - left:in_right - left]
        return x

    def _boxes(self, sizes, start_scale: int, stop_scale: int, needed: Box | None) -> dict[int, Any]:
        """Per scale: ``None`` (the generator runs on the whole image) or ``(box of its input,
        box of its output that is needed)``, each ``(top, bottom, left, right)``."""
        boxes: dict[int, Any] = {scale: None for scale in range(start_scale, stop_scale + 1)}
        if needed is None:
            return boxes
        top, bottom, left, right = (int(v) for v in needed)
        for scale in range(stop_scale, start_scale - 1, -1):
            height, width = sizes[scale]
            top, left, bottom, right = max(top, 0), max(left, 0), min(bottom, height), min(right, width)
            if bottom <= top or right <= left:  # nothing is needed: a 1x1 run keeps the shapes valid
                top, bottom, left, right = 0, 1, 0, 1
            reach = self.generator(scale).reach
            outer = (max(top - reach, 0), min(bottom + reach, height), max(left - reach, 0), min(right + reach, width))
            if (outer[1] - outer[0]) * (outer[3] - outer[2]) < 0.8 * height * width:
                boxes[scale] = (outer, (top, bottom, left, right))
            else:  # nearly the whole image: not worth the copies
                outer = (0, height, 0, width)
            if scale > start_scale:  # the coarser scale's pixels that the upsampling to this one reads
                top, bottom = resize_source_span(outer[0], outer[1], sizes[scale - 1][0], height)
                left, right = resize_source_span(outer[2], outer[3], sizes[scale - 1][1], width)
        return boxes
