"""The image-to-image networks of CycleGAN (Zhu et al., 2017) and pix2pix (Isola et al., 2017).

Three definitions, each parameterised as in the papers' reference setups:

* :class:`ResnetGenerator` (CycleGAN): a 7x7 stem, ``n_downsampling`` stride-2 convolutions,
  ``n_blocks`` residual blocks :math:`x + F(x)`, as many transposed convolutions, a 7x7 head and
  :math:`\\tanh`. Reflection padding avoids border artefacts. The reference is ``ngf=64``,
  ``n_blocks=9`` (256 px) or ``6`` (128 px).
* :class:`UnetGenerator` (pix2pix): an encoder of ``num_downs`` stride-2 4x4 convolutions and a
  mirrored decoder of transposed convolutions, each decoder level concatenated with the encoder
  output of the same resolution (skip connections). ``num_downs=8`` maps 256 px to 1x1.
* :class:`PatchDiscriminator`: the PatchGAN critic, a fully convolutional stack whose every
  output logit sees one patch of the input; with ``n_layers=3`` the patch is 70x70 pixels.

All networks work on images in :math:`[-1, 1]`, any number of channels, and are initialised
with the reference scheme (:func:`init_reference_weights`): convolution weights
:math:`\\sim \\mathcal N(0, 0.02^2)`, norm scales :math:`\\sim \\mathcal N(1, 0.02^2)`, biases 0.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from singan_insert.errors import SinganInsertError

NormName = Literal["instance", "batch"]

__all__ = [
    "NormName",
    "PatchDiscriminator",
    "ResnetBlock",
    "ResnetGenerator",
    "UnetGenerator",
    "init_reference_weights",
]


def _norm_layer(norm: NormName, channels: int) -> nn.Module:
    # Instance norm without affine parameters and running statistics is the CycleGAN reference;
    # batch norm (affine, with running statistics) is the pix2pix reference.
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    raise SinganInsertError(f"Unknown norm {norm!r}; use 'instance' or 'batch'.")


def _conv_bias(norm: NormName) -> bool:
    # A convolution followed by batch norm does not need a bias (the norm's shift is one);
    # instance norm without affine parameters has no shift, so the convolution keeps its bias.
    return norm != "batch"


def _check_positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or value < minimum:
        raise SinganInsertError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def init_reference_weights(module: nn.Module, std: float = 0.02) -> nn.Module:
    """Initialise ``module`` in place as the reference implementations do, and return it.

    Convolution weights are drawn from :math:`\\mathcal N(0, \\mathrm{std}^2)`, norm scales
    from :math:`\\mathcal N(1, \\mathrm{std}^2)`; all biases are zero. Uses the global torch
    random generator, so seed it first for a reproducible initialisation.
    """
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(layer.weight, 0.0, std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.normal_(layer.weight, 1.0, std)
            nn.init.zeros_(layer.bias)
    return module


class ResnetBlock(nn.Module):
    """Residual block :math:`x + F(x)`, :math:`F` = (pad, 3x3 conv, norm, ReLU) x 2 without the last ReLU."""

    def __init__(self, channels: int, norm: NormName = "instance", dropout: float = 0.0):
        super().__init__()
        bias = _conv_bias(norm)
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=bias),
            _norm_layer(norm, channels),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=bias),
            _norm_layer(norm, channels),
        ]
        self.residual = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.residual(x)


class ResnetGenerator(nn.Module):
    """The CycleGAN generator: encoder, residual blocks, decoder (Johnson et al. 2016 style).

    Args:
        in_channels: channels of the input image (1 for a grayscale MR slice).
        out_channels: channels of the output image.
        ngf: filters of the first layer, doubled at each downsampling (>= 1; reference 64).
        n_blocks: residual blocks at the bottleneck (>= 0; reference 9 at 256 px, 6 at 128 px).
        n_downsampling: stride-2 stages (>= 1; reference 2). Input height and width must be
            multiples of :attr:`size_divisor` :math:`= 2^{n_{down}}`.
        norm: ``"instance"`` (reference) or ``"batch"``.
        dropout: dropout probability inside the residual blocks (reference 0).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        ngf: int = 64,
        n_blocks: int = 9,
        n_downsampling: int = 2,
        norm: NormName = "instance",
        dropout: float = 0.0,
    ):
        super().__init__()
        for name, value, minimum in (
            ("in_channels", in_channels, 1),
            ("out_channels", out_channels, 1),
            ("ngf", ngf, 1),
            ("n_blocks", n_blocks, 0),
            ("n_downsampling", n_downsampling, 1),
        ):
            _check_positive(name, value, minimum)
        bias = _conv_bias(norm)
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, 7, bias=bias),
            _norm_layer(norm, ngf),
            nn.ReLU(inplace=True),
        ]
        for level in range(n_downsampling):
            width = ngf * 2**level
            layers += [
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=bias),
                _norm_layer(norm, 2 * width),
                nn.ReLU(inplace=True),
            ]
        bottleneck = ngf * 2**n_downsampling
        layers += [ResnetBlock(bottleneck, norm, dropout) for _ in range(n_blocks)]
        for level in reversed(range(n_downsampling)):
            width = ngf * 2**level
            layers += [
                nn.ConvTranspose2d(
                    2 * width, width, 3, stride=2, padding=1, output_padding=1, bias=bias
                ),
                _norm_layer(norm, width),
                nn.ReLU(inplace=True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        self.size_divisor = 2**n_downsampling
        init_reference_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class UnetGenerator(nn.Module):
    """The pix2pix generator: a U-Net with ``num_downs`` resolution levels.

    Encoder level :math:`i` outputs :math:`\\mathrm{ngf} \\cdot \\min(2^i, 8)` channels at
    :math:`1/2^{i+1}` of the input size; the decoder mirrors it and concatenates each level with
    the encoder output of the same size. As in the reference, the decoder levels between the
    four outermost and the innermost one (those of ``ngf * 8`` channels; there are
    ``num_downs - 5``) use dropout.

    Args:
        in_channels: channels of the input image.
        out_channels: channels of the output image.
        num_downs: number of stride-2 levels (>= 5, as in the reference; 8 for 256 px, 7 for
            128 px). Height and width must be multiples of :attr:`size_divisor`
            :math:`= 2^{\\mathrm{num\\_downs}}`.
        ngf: filters of the outermost level (>= 1; reference 64).
        norm: ``"batch"`` (reference) or ``"instance"``.
        dropout: dropout probability of the middle decoder levels (reference 0.5; 0 disables).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        num_downs: int = 8,
        ngf: int = 64,
        norm: NormName = "batch",
        dropout: float = 0.5,
    ):
        super().__init__()
        for name, value, minimum in (
            ("in_channels", in_channels, 1),
            ("out_channels", out_channels, 1),
            ("ngf", ngf, 1),
            ("num_downs", num_downs, 5),
        ):
            _check_positive(name, value, minimum)
        bias = _conv_bias(norm)
        widths = [ngf * min(2**level, 8) for level in range(num_downs)]
        innermost = num_downs - 1

        def down(c_in: int, c_out: int) -> nn.Conv2d:
            return nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=bias)

        def up(c_in: int, c_out: int, with_bias: bool = bias) -> nn.ConvTranspose2d:
            return nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=with_bias)

        encoders: list[nn.Module] = [down(in_channels, widths[0])]
        decoders: list[nn.Module] = [
            nn.Sequential(nn.ReLU(inplace=True), up(2 * widths[0], out_channels, True), nn.Tanh())
        ]
        for level in range(1, num_downs):
            if level == innermost:
                # The innermost level has a 1x1 map at the reference size: no norm there.
                encoders.append(
                    nn.Sequential(nn.LeakyReLU(0.2), down(widths[level - 1], widths[level]))
                )
                decoders.append(
                    nn.Sequential(
                        nn.ReLU(inplace=True),
                        up(widths[level], widths[level - 1]),
                        _norm_layer(norm, widths[level - 1]),
                    )
                )
                continue
            # Not in place: the encoder's input is also kept as a skip connection.
            encoders.append(
                nn.Sequential(
                    nn.LeakyReLU(0.2),
                    down(widths[level - 1], widths[level]),
                    _norm_layer(norm, widths[level]),
                )
            )
            decoder: list[nn.Module] = [
                nn.ReLU(inplace=True),
                up(2 * widths[level], widths[level - 1]),
                _norm_layer(norm, widths[level - 1]),
            ]
            if level >= 4 and dropout > 0:
                decoder.append(nn.Dropout(dropout))
            decoders.append(nn.Sequential(*decoder))
        self.encoders = nn.ModuleList(encoders)
        self.decoders = nn.ModuleList(decoders)
        self.size_divisor = 2**num_downs
        init_reference_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        for level in reversed(range(len(self.decoders))):
            x = self.decoders[level](x)
            if level > 0:
                x = torch.cat([skips[level - 1], x], dim=1)
        return x


class PatchDiscriminator(nn.Module):
    """PatchGAN critic: one real/fake logit per overlapping input patch.

    Layers: a 4x4 stride-2 convolution with ``ndf`` filters and LeakyReLU(0.2); then
    ``n_layers - 1`` stride-2 and one stride-1 4x4 convolutions with
    :math:`\\mathrm{ndf} \\cdot \\min(2^n, 8)` filters, norm and LeakyReLU; then a stride-1 4x4
    convolution to one channel. Walking back from one output logit through the 4x4 convolutions
    (:math:`r \\leftarrow (r - 1)\\,s + 4`) gives its receptive field: 70x70 pixels for
    ``n_layers=3`` (34 for 2, 142 for 4); see :meth:`receptive_field`.

    Args:
        in_channels: channels of the judged image (2 for pix2pix's conditional critic, which
            sees the input and the output side by side).
        ndf: filters of the first layer (>= 1; reference 64).
        n_layers: stride-2 layers (>= 1; reference 3, the 70x70 PatchGAN).
        norm: ``"instance"`` or ``"batch"``.
    """

    def __init__(
        self, in_channels: int = 1, ndf: int = 64, n_layers: int = 3, norm: NormName = "instance"
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("ndf", ndf), ("n_layers", n_layers)):
            _check_positive(name, value)
        bias = _conv_bias(norm)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width = ndf
        for n in range(1, n_layers + 1):
            stride = 2 if n < n_layers else 1
            next_width = ndf * min(2**n, 8)
            layers += [
                nn.Conv2d(width, next_width, 4, stride=stride, padding=1, bias=bias),
                _norm_layer(norm, next_width),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*layers)
        self.n_layers = n_layers
        init_reference_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @staticmethod
    def receptive_field(n_layers: int) -> int:
        """Side in pixels of the input patch one output logit sees (70 for ``n_layers=3``)."""
        # Walk back from one output pixel through every 4x4 convolution: r <- (r - 1) * s + 4.
        strides = [2] * n_layers + [1, 1]
        field = 1
        for stride in reversed(strides):
            field = (field - 1) * stride + 4
        return field

    @staticmethod
    def output_size(input_size: int, n_layers: int = 3) -> int:
        """Side of the logit map for a square input of ``input_size`` pixels (< 1: too small)."""
        size = input_size
        for stride in [2] * n_layers + [1, 1]:
            size = (size + 2 - 4) // stride + 1
        return size
