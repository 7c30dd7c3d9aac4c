"""Training of the generator pyramid on ONE 2D slice: presets, losses, noise, checkpoints.

Losses (per scale :math:`s`, generators of coarser scales frozen), as in SinGAN:

.. math::

    \\mathcal L_D = \\mathbb E[D(\\tilde x)] - \\mathbb E[D(x)] + \\lambda_{GP}\\,
        \\mathbb E\\big[(\\lVert\\nabla D(\\hat x)\\rVert - 1)^2\\big],\\qquad
    \\mathcal L_G = -\\mathbb E[D(\\tilde x)] + \\alpha\\,\\lVert G_s(x^{rec}_{s}) - x_s\\rVert_2^2,

with :math:`\\tilde x = G_s(\\uparrow \\tilde x_{s-1} + \\sigma_s z)` a random sample,
:math:`x^{rec}_s` the upsampled reconstruction of the coarser scales, :math:`\\hat x` a random
interpolation of real and fake (WGAN-GP; the gradient norm is taken per pixel over channels as
in the official code), and the noise amplitude
:math:`\\sigma_s = 0.1\\,\\mathrm{RMSE}(x_s, x^{rec}_s)` (1 at a scale trained from pure noise).

Two presets (:meth:`TrainingConfig.preset`):

``reference``
    The official SinGAN schedule: factor 0.75, min size 25, max size 250, 2000 iterations per
    scale, 3 G + 3 D steps, Adam lr 5e-4 betas (0.5, 0.999), lr x0.1 at 80 %, alpha 10,
    lambda_GP 0.1, 32 filters doubling every 4 scales up to 128, every scale trained, the
    coarsest from pure noise.
``fast`` (default)
    Specialised for harmonization, like ConSinGAN's harmonization mode: only the
    ``trained_scales`` finest scales are trained, because injection at scale :math:`n` only ever
    runs :math:`G_n .. G_N`. The coarsest trained scale does not start from noise but from the
    real slice downsampled one scale further, with augmentations (flips, intensity jitter and
    cut-and-paste of random patches with random contrast), so that the generators learn to
    turn an image with a foreign, pasted patch into one with the slice's patch statistics,
    which is exactly the harmonization task. Fewer iterations, 1 G + 1 D step, a lazy gradient
    penalty (every ``gp_every`` critic steps, weight scaled up to match, as StyleGAN2 does) and
    narrower networks at the finest scales keep it within minutes on two CPU cores.

Training is resumable: re-running on the same ``out_dir`` continues from the last checkpoint
(written atomically after each scale and every ``checkpoint_every`` iterations, with the
optimizer and random-number states) and ends bit-identical to an uninterrupted run on CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from singan_insert.errors import SinganInsertError
from singan_insert.harmonizer.normalization import PercentileNormalization
from singan_insert.checks import check_finite, check_int, check_real, check_seed, check_spacing
from singan_insert.harmonizer.model_file import (
    MAX_SIZE,
    load_tensors,
    optimizer_to_tensors,
    save_tensors,
    state_dict_to_tensors,
    tensors_to_optimizer,
    tensors_to_state_dict,
)
from singan_insert.harmonizer.networks import ARCHITECTURES, GeneratorPyramid, PatchCritic, ScaleGenerator, build_generator
from singan_insert.harmonizer.pyramid import PyramidGeometry, resize
from singan_insert.io import atomic_write_png, atomic_write_text

if TYPE_CHECKING:  # for the return annotation only: model imports this module's config
    from singan_insert.harmonizer.model import Harmonizer

CHECKPOINT_KIND = "singan-insert-checkpoint"
CHECKPOINT_NAME = "checkpoint.safetensors"
MODEL_NAME = "harmonizer.safetensors"


@dataclass(frozen=True)
class TrainingConfig:
    """Hyper-parameters of pyramid training. Build one with :meth:`preset` and ``replace``.

    Args:
        scale_factor: ratio between consecutive scales, in (0, 1).
        min_size: short side of the coarsest scale in pixels (>= 4).
        max_size: long side of the finest scale; larger slices are shrunk.
        iterations: optimisation iterations per scale (>= 1).
        generator_steps, critic_steps: G and D updates per iteration.
        learning_rate, betas: Adam settings for both networks.
        lr_decay_at: fraction of ``iterations`` after which the lr is multiplied by 0.1.
        alpha: weight of the reconstruction loss.
        lambda_gp: weight of the gradient penalty.
        gp_every: compute the penalty every k critic steps (weight multiplied by k).
        width: filters of the coarsest trained scale.
        max_width: cap of the filter count.
        width_doubling_every: double the filters every k scales (official: 4); 0 = never.
        finest_width: filters of the ``finest_width_scales`` finest scales (None = schedule).
        finest_width_scales: how many of the finest scales use ``finest_width``.
        num_layers: convolutions per generator and critic.
        trained_scales: train only this many finest scales (None: all, from noise).
        augment: augment the coarse input of the first trained scale (harmonization mode).
        crop_size: train G and D of scales larger than this on a random square crop of this
            size per iteration (None: whole scale). Both networks are fully convolutional with
            an 11 px receptive field, so a crop is a smaller bag of the same patches.
        noise_amp_factor: :math:`\\sigma_s` = factor x reconstruction RMSE.
        checkpoint_every: iterations between in-scale checkpoints when an ``out_dir`` is given.
        arch: generator architecture, ``"singan"`` (official) or ``"singan-mask"`` (the mask of
            the foreign region is an input channel; see :func:`~singan_insert.harmonizer.networks.build_generator`).
        restoration_weight: weight :math:`\\beta \\ge 0` of the self-supervised restoration loss
            (needs ``arch="singan-mask"``): regions of the scale's reconstruction input are
            re-mapped (see :func:`corrupt_region`) and the generator, told where by the mask,
            must restore the real slice there, :math:`\\beta\\, \\operatorname{mean}_m (G_s(\\tilde x^{rec}_s, m) - x_s)^2`.
            The re-mappings keep the region's internal structure (only its intensities change),
            so the restoration is a correction of a foreign region, not an inpainting of it.
    """

    scale_factor: float = 0.75
    min_size: int = 25
    max_size: int = 250
    iterations: int = 2000
    generator_steps: int = 3
    critic_steps: int = 3
    learning_rate: float = 5e-4
    betas: tuple[float, float] = (0.5, 0.999)
    lr_decay_at: float = 0.8
    alpha: float = 10.0
    lambda_gp: float = 0.1
    gp_every: int = 1
    width: int = 32
    max_width: int = 128
    width_doubling_every: int = 4
    finest_width: int | None = None
    finest_width_scales: int = 0
    num_layers: int = 5
    trained_scales: int | None = None
    augment: bool = False
    crop_size: int | None = None
    noise_amp_factor: float = 0.1
    checkpoint_every: int = 100
    arch: str = "singan"
    restoration_weight: float = 0.0

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "TrainingConfig":
        """A named preset with any field overridden by keyword (``None`` values are ignored).

        ``"reference"`` (official SinGAN), ``"fast"`` (default) or ``"tiny"`` (tests, seconds);
        e.g. ``TrainingConfig.preset("fast", iterations=200)``. Unknown field names raise
        :class:`~singan_insert.errors.SinganInsertError`; values are checked as for any config.
        """
        presets = {
            "reference": {},
            "fast": dict(
                max_size=256, iterations=400, generator_steps=1, critic_steps=1, gp_every=4,
                max_width=32, finest_width=16, finest_width_scales=2, trained_scales=5,
                augment=True, crop_size=64, checkpoint_every=50,
            ),
            "tiny": dict(
                min_size=12, max_size=48, iterations=30, generator_steps=1, critic_steps=1,
                gp_every=2, width=8, max_width=8, trained_scales=3, augment=True, checkpoint_every=10,
            ),
        }
        if name not in presets:
            raise SinganInsertError(f"Unknown preset {name!r}; choose 'fast', 'reference' or 'tiny'.")
        unknown = sorted(set(overrides) - set(cls.__dataclass_fields__))
        if unknown:
            raise SinganInsertError(
                f"Unknown training setting(s) {unknown}; valid ones are {sorted(cls.__dataclass_fields__)}.")
        given = {key: value for key, value in overrides.items() if value is not None}
        return cls(**{**presets[name], **given})

    def __post_init__(self) -> None:
        # NaN, infinity, fractions and out-of-range values fail here, at construction, not as
        # NaN losses or a crash hours into training.
        check_real(self.scale_factor, "scale_factor", 0, 1, open_minimum=True, open_maximum=True)
        # Integral floats (2.0 from a YAML file) are stored as ints: the config's fingerprint,
        # which a resume compares, must not depend on how a number was written.
        for name, low in (("min_size", 4), ("max_size", self.min_size), ("iterations", 1), ("generator_steps", 1),
                          ("critic_steps", 1), ("gp_every", 1), ("width", 1), ("max_width", 1),
                          ("width_doubling_every", 0), ("finest_width_scales", 0), ("num_layers", 2),
                          ("checkpoint_every", 1)):
            object.__setattr__(self, name, check_int(getattr(self, name), name, low))
        check_int(self.max_size, "max_size", maximum=MAX_SIZE)
        # A crop smaller than the generators' receptive field (one pixel per 3x3 convolution on
        # each side) shows them no patch of the slice whole.
        for name, low in (("finest_width", 1), ("trained_scales", 1), ("crop_size", 2 * self.num_layers + 1)):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_int(getattr(self, name), name, low))
        if not isinstance(self.augment, (bool, np.bool_)):
            raise SinganInsertError(f"augment must be True or False, got {self.augment!r}.")
        check_real(self.learning_rate, "learning_rate", 0, 1, open_minimum=True, open_maximum=True)
        if len(self.betas) != 2:
            raise SinganInsertError(f"betas must be two numbers, got {self.betas!r}.")
        for beta in self.betas:
            check_real(beta, "betas", 0, 1, open_maximum=True)
        check_real(self.lr_decay_at, "lr_decay_at", 0, 1)
        for name in ("alpha", "lambda_gp", "noise_amp_factor", "restoration_weight"):
            check_real(getattr(self, name), name, 0)
        if self.arch not in ARCHITECTURES:
            raise SinganInsertError(f"arch must be one of {ARCHITECTURES}, got {self.arch!r}.")
        if self.restoration_weight > 0 and self.arch != "singan-mask":
            raise SinganInsertError(
                "The restoration loss needs the mask as an input channel: pass arch='singan-mask'.")

    def width_at(self, scale: int, num_scales: int) -> int:
        if self.finest_width is not None and scale >= num_scales - self.finest_width_scales:
            return self.finest_width
        doublings = scale // self.width_doubling_every if self.width_doubling_every else 0
        return min(self.width * 2**doublings, self.max_width)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainingConfig":
        data = dict(data)
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise SinganInsertError(
                f"Unknown training setting(s) {unknown}; valid ones are {sorted(cls.__dataclass_fields__)}.")
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)


def validate_slice(image: Any, name: str = "training slice") -> torch.Tensor:
    """Check a 2D slice and return it as a float32 tensor (clear errors for bad input)."""
    if isinstance(image, np.ndarray):
        if np.iscomplexobj(image) or not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
            raise SinganInsertError(f"The {name} has dtype {image.dtype}; pass a real-valued numeric array.")
        image = torch.from_numpy(np.ascontiguousarray(image).astype(np.float32))
    elif torch.is_tensor(image):
        if image.is_complex() or image.dtype == torch.bool:
            raise SinganInsertError(f"The {name} has dtype {image.dtype}; pass a real-valued tensor.")
        image = image.detach().float()
    else:
        raise SinganInsertError(f"The {name} must be a numpy array or a torch tensor, got {type(image).__name__}.")
    image = image.squeeze() if image.ndim > 2 and all(d == 1 for d in image.shape[:-2]) else image
    if image.ndim != 2:
        raise SinganInsertError(
            f"The {name} must be 2D, got shape {tuple(image.shape)}. For a volume, pick a slice "
            "(e.g. `singan-insert train volume.nii.gz --axis 2 --slice 40`, or --slice auto with a label)."
        )
    check_finite(image, name)
    return image


def train_harmonizer(
    image: Any,
    config: TrainingConfig | None = None,
    out_dir: str | Path | None = None,
    seed: int = 0,
    spacing: tuple[float, float] | None = None,
    device: str | torch.device | None = None,
    provenance: dict[str, Any] | None = None,
    progress: bool = True,
    sample_figures: bool = True,
    stop_after_iterations: int | None = None,
    annotation: Any | None = None,
) -> "Harmonizer | None":
    """Train a harmonizer pyramid on one 2D slice and return a :class:`~singan_insert.Harmonizer`.

    Args:
        image: the 2D training slice (any intensity units; robustly normalised to [-1, 1]).
        config: hyper-parameters; default ``TrainingConfig.preset("fast")``.
        out_dir: where the model, checkpoints, sample PNGs and the training log go. If it
            holds a checkpoint of the same run (same slice, config and seed), training resumes.
        seed: seeds every random draw (noise, augmentation, initialisation).
        spacing: (row, col) pixel size in mm of ``image``, stored in the model so that slices
            of other spacings are resampled at harmonization.
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available).
        provenance: free-form JSON (source file, axis, slice index, crop, modality...);
            ``"orientation"``, the training volume's axis codes (``"RAS"``...,
            :func:`singan_insert.io.orientation_codes` of its affine), makes insertion bring each
            target into that orientation first (:mod:`singan_insert.insertion.orientation`);
            :func:`~singan_insert.harmonizer.training_slice.load_training_slice` records it.
        progress: show a tqdm bar per scale.
        sample_figures: write a PNG of the reconstruction and random samples per scale.
        stop_after_iterations: stop (as if interrupted) after this many iterations (>= 1) in
            this call, and return ``None``; the last checkpoint stays in ``out_dir`` (required)
            for a later resume. For tests and time-boxing.
        annotation: optional 2D tumor mask of ``image`` (same grid): the automatic appearance
            then takes B's tumor look from it (see :meth:`~singan_insert.Harmonizer.annotate`).
            It does not change training, so adding one later needs no retraining.
    """
    from singan_insert.harmonizer.model import Harmonizer
    from singan_insert.devices import select_device

    config = config or TrainingConfig.preset("fast")
    seed = check_seed(seed)
    if stop_after_iterations is not None:
        stop_after_iterations = check_int(stop_after_iterations, "stop_after_iterations", 1)
        if out_dir is None:
            raise SinganInsertError("stop_after_iterations stops a training to resume it later: pass out_dir, "
                                    "where its checkpoint is kept (without one, the work would be lost).")
    device = select_device(device)
    slice_2d = validate_slice(image)
    if annotation is not None and tuple(np.shape(annotation)) != tuple(slice_2d.shape):
        raise SinganInsertError(f"The tumor annotation has shape {tuple(np.shape(annotation))} but the "
                                f"training slice {tuple(slice_2d.shape)}: draw it on the same slice.")
    if annotation is not None and not np.any(np.nan_to_num(np.asarray(annotation, dtype=np.float64)) > 0):
        raise SinganInsertError("The tumor annotation is empty: mark the tumor on the training slice, or "
                                "pass annotation=None.")
    normalization = PercentileNormalization.fit(slice_2d)
    geometry = PyramidGeometry.from_shape(
        tuple(slice_2d.shape), config.scale_factor, config.min_size, config.max_size
    )
    num_scales = geometry.num_scales
    first_scale = 0 if config.trained_scales is None else max(num_scales - config.trained_scales, 0)
    if config.trained_scales is not None and first_scale == 0:
        # Harmonization mode starts its coarsest trained scale from the real slice one scale
        # coarser; a pyramid with no scale to spare is trained from noise (the paper's mode),
        # and the augmentations, which act on that coarser real slice, are never used.
        warnings.warn(
            f"The {slice_2d.shape[0]}x{slice_2d.shape[1]} px slice gives a pyramid of {num_scales} scales, no more "
            f"than the {config.trained_scales} the config trains (trained_scales): the whole pyramid is trained "
            "from noise, as in the paper's mode, not from the real slice with augmentations. Use a larger "
            f"slice (or crop), a smaller min_size, or trained_scales={num_scales - 1} for the harmonization mode.",
            SmallSliceWarning, stacklevel=2)
    model_spacing = None
    if spacing is not None:
        spacing = check_spacing(spacing, 2)
        shrink = geometry.finest[0] / slice_2d.shape[0], geometry.finest[1] / slice_2d.shape[1]
        model_spacing = (float(spacing[0]) / shrink[0], float(spacing[1]) / shrink[1])

    real = normalization.to_model(slice_2d)[None, None].to(device)
    reals = [resize(real, size) for size in geometry.sizes]
    fingerprint = _fingerprint(slice_2d, config, seed)

    state = _TrainingState.start(config, geometry, first_scale, seed, device)
    checkpoint_path = Path(out_dir) / CHECKPOINT_NAME if out_dir is not None else None
    if checkpoint_path is not None and checkpoint_path.exists():
        state = _TrainingState.load(checkpoint_path, fingerprint, config, geometry, first_scale, device)

    log: list[dict[str, Any]] = list(state.log)
    total_done = 0
    started = time.perf_counter()
    while state.scale < num_scales:
        scale = state.scale
        trainer = _ScaleTrainer(state, reals, geometry, config, device)
        scale_started, iterations_before = time.perf_counter(), state.iteration
        bar = tqdm(
            total=config.iterations, initial=state.iteration, disable=not progress,
            desc=f"scale {scale}/{num_scales - 1} {geometry.sizes[scale][0]}x{geometry.sizes[scale][1]}",
            unit="it", leave=True,
        )
        while state.iteration < config.iterations:
            if stop_after_iterations is not None and total_done >= stop_after_iterations:
                bar.close()
                return None
            losses = trainer.step()
            state.iteration += 1
            total_done += 1
            bar.update(1)
            if state.iteration % 25 == 0 or state.iteration == config.iterations:
                bar.set_postfix(d=f"{losses['critic']:.3f}", rec=f"{losses['reconstruction']:.4f}")
            if checkpoint_path is not None and state.iteration % config.checkpoint_every == 0 \
                    and state.iteration < config.iterations:
                state.save(checkpoint_path, fingerprint, normalization)
        bar.close()
        entry = trainer.finish()
        ran = config.iterations - iterations_before
        entry["seconds"] = time.perf_counter() - scale_started
        entry["seconds_per_iteration"] = entry["seconds"] / ran if ran else None
        log.append(entry)
        state.log = log
        if sample_figures and out_dir is not None:
            _write_sample_figure(Path(out_dir) / f"samples_scale{scale:02d}.png", state, reals, geometry, scale)
        if checkpoint_path is not None:
            state.save(checkpoint_path, fingerprint, normalization)

    pyramid = GeneratorPyramid(state.generators, state.amplitudes, first_scale)
    harmonizer = Harmonizer(
        pyramid=pyramid,
        geometry=geometry,
        normalization=normalization,
        spacing=model_spacing,
        reconstruction_noise=state.reconstruction_noise,
        metadata={
            "training": {
                "config": config.to_dict(),
                "seed": seed,
                # The slice as passed (after any crop): what an annotation must be drawn on.
                "slice_shape": [int(n) for n in slice_2d.shape],
                "fingerprint": fingerprint,
                "log": log,
                "device": str(device),
                "seconds_this_run": time.perf_counter() - started,
                "torch_version": torch.__version__,
            },
            "provenance": provenance or {},
        },
        training_slice=reals[-1][0, 0].cpu(),
    )
    if annotation is not None:
        harmonizer.annotate(annotation)
    if out_dir is not None:
        harmonizer.save(Path(out_dir) / MODEL_NAME)
        atomic_write_text(Path(out_dir) / "training_log.json", json.dumps(log, indent=2))
    return harmonizer


#: Settings added after checkpoints existed: at their defaults they leave the fingerprint as
#: it was, so that an older run still resumes.
_FINGERPRINT_NEUTRAL = {"arch": "singan", "restoration_weight": 0.0}


def _fingerprint(image: torch.Tensor, config: TrainingConfig, seed: int) -> str:
    digest = hashlib.sha256(image.numpy().tobytes())
    settings = {k: v for k, v in config.to_dict().items() if _FINGERPRINT_NEUTRAL.get(k, object()) != v}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    digest.update(str(seed).encode())
    return digest.hexdigest()[:16]


@dataclass
class _TrainingState:
    """Everything needed to continue training exactly where it stopped."""

    scale: int
    iteration: int
    generators: list[ScaleGenerator]
    amplitudes: list[float]
    rng: torch.Generator
    reconstruction_noise: torch.Tensor | None
    critic: PatchCritic | None = None
    generator_optimizer: torch.optim.Optimizer | None = None
    critic_optimizer: torch.optim.Optimizer | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    first_scale: int = 0
    config: TrainingConfig | None = None
    geometry: PyramidGeometry | None = None
    seed: int = 0
    current_generator: ScaleGenerator | None = None
    _pending_optimizers: dict[str, Any] | None = None

    @classmethod
    def start(cls, config, geometry, first_scale, seed, device) -> "_TrainingState":
        rng = torch.Generator(device="cpu").manual_seed(seed)
        noise = None
        if first_scale == 0:
            noise = torch.randn((1, 1, *geometry.sizes[0]), generator=rng).to(device)
        return cls(first_scale, 0, [], [], rng, noise, first_scale=first_scale, config=config,
                   geometry=geometry, seed=seed)

    # The current scale's networks are created lazily by _ScaleTrainer, so that a resumed
    # state and a fresh one go through the same code path.
    def save(self, path: Path, fingerprint: str, normalization: PercentileNormalization) -> None:
        tensors: dict[str, torch.Tensor] = {"rng_state": self.rng.get_state()}
        if self.reconstruction_noise is not None:
            tensors["reconstruction_noise"] = self.reconstruction_noise
        for index, generator in enumerate(self.generators):
            tensors.update(state_dict_to_tensors(f"generators.{index}", generator))
        meta: dict[str, Any] = {
            "fingerprint": fingerprint,
            "seed": self.seed,
            "scale": self.scale,
            "iteration": self.iteration,
            "amplitudes": self.amplitudes,
            "log": self.log,
            "normalization": normalization.to_dict(),
        }
        if self.critic is not None:
            tensors.update(state_dict_to_tensors("critic", self.critic))
            meta["critic_width"] = self.critic.body[0].out_channels
        if self.iteration > 0:
            tensors.update(state_dict_to_tensors("current_generator", self.current_generator))
            g_tensors, g_json = optimizer_to_tensors("opt_g", self.generator_optimizer)
            d_tensors, d_json = optimizer_to_tensors("opt_d", self.critic_optimizer)
            tensors.update(g_tensors)
            tensors.update(d_tensors)
            meta["optimizers"] = {"generator": g_json, "critic": d_json}
        save_tensors(path, tensors, CHECKPOINT_KIND, meta)

    @classmethod
    def load(cls, path, fingerprint, config, geometry, first_scale, device) -> "_TrainingState":
        tensors, meta = load_tensors(path, CHECKPOINT_KIND)
        if meta["fingerprint"] != fingerprint:
            raise SinganInsertError(
                f"{path} belongs to another training run (different slice, settings or seed). "
                "Use another output folder, or delete the checkpoint to start over."
            )
        rng = torch.Generator(device="cpu")
        rng.set_state(tensors["rng_state"])
        generators = []
        for index, _ in enumerate(meta["amplitudes"]):
            scale = first_scale + index
            generator = build_generator(config.arch, config.width_at(scale, geometry.num_scales), config.num_layers)
            generator.load_state_dict(tensors_to_state_dict(f"generators.{index}", tensors))
            generators.append(generator.to(device).requires_grad_(False).eval())
        noise = tensors.get("reconstruction_noise")
        state = cls(
            meta["scale"], meta["iteration"], generators, list(meta["amplitudes"]), rng,
            noise.to(device) if noise is not None else None, log=meta["log"],
            first_scale=first_scale, config=config, geometry=geometry, seed=meta["seed"],
        )
        if "critic_width" in meta:
            state.critic = PatchCritic(width=meta["critic_width"], num_layers=config.num_layers).to(device)
            state.critic.load_state_dict(tensors_to_state_dict("critic", tensors))
        if meta["iteration"] > 0:
            state._pending_optimizers = {"tensors": tensors, "json": meta["optimizers"]}
        return state


class _ScaleTrainer:
    """Trains the generator and critic of ``state.scale`` (coarser generators frozen)."""

    def __init__(self, state: _TrainingState, reals, geometry: PyramidGeometry, config: TrainingConfig, device):
        self.state, self.reals, self.geometry, self.config, self.device = state, reals, geometry, config, device
        scale = state.scale
        self.scale = scale
        width = config.width_at(scale, geometry.num_scales)
        # Initialise from a per-scale seed, so that a resumed run draws the same weights,
        # without touching the caller's global random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(state.seed * 1000 + scale)
            generator = build_generator(config.arch, width, config.num_layers).to(device)
            critic = PatchCritic(width=width, num_layers=config.num_layers).to(device)
        if state.generators and config.width_at(scale - 1, geometry.num_scales) == width:
            # Official SinGAN: start from the coarser scale's weights when the widths match.
            generator.load_state_dict(state.generators[-1].state_dict())
            if state.critic is not None:
                critic.load_state_dict(state.critic.state_dict())
        self.generator, self.critic = generator, critic
        self.opt_g = torch.optim.Adam(generator.parameters(), lr=config.learning_rate, betas=config.betas)
        self.opt_d = torch.optim.Adam(critic.parameters(), lr=config.learning_rate, betas=config.betas)
        state.critic, state.generator_optimizer, state.critic_optimizer = critic, self.opt_g, self.opt_d
        state.current_generator = generator

        self.real = reals[scale]
        self.reconstruction_input = self._reconstruction_input()
        if scale == 0:
            self.amplitude = 1.0
        else:
            rmse = torch.sqrt(F.mse_loss(self.reconstruction_input, self.real)).item()
            self.amplitude = config.noise_amp_factor * rmse
        self.reconstruction_noise = state.reconstruction_noise if scale == 0 else None
        self.frozen = GeneratorPyramid(state.generators, state.amplitudes, state.first_scale)
        self.last_losses: dict[str, float] = {}
        # Before a resumed scale's weights are loaded: the log's starting point is the scale's
        # initial generator, as in an uninterrupted run.
        self.initial_rmse = self._reconstruction_rmse()
        pending = state._pending_optimizers
        if pending is not None and state.iteration > 0:
            critic.load_state_dict(tensors_to_state_dict("critic", pending["tensors"]))
            generator.load_state_dict(tensors_to_state_dict("current_generator", pending["tensors"]))
            tensors_to_optimizer("opt_g", self.opt_g, pending["tensors"], pending["json"]["generator"])
            tensors_to_optimizer("opt_d", self.opt_d, pending["tensors"], pending["json"]["critic"])
            state._pending_optimizers = None

    def _reconstruction_rmse(self) -> float:
        with torch.no_grad():
            noise = 0.0 if self.reconstruction_noise is None else self.amplitude * self.reconstruction_noise
            rec = self.generator(self.reconstruction_input, noise)
            return torch.sqrt(F.mse_loss(rec, self.real)).item()

    def _noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.state.rng).to(self.device)

    def _base(self, augment: bool) -> torch.Tensor:
        """Input of the first trained scale: zeros (from noise) or the coarser real slice."""
        first = self.state.first_scale
        if first == 0:
            return torch.zeros((1, 1, *self.geometry.sizes[0]), device=self.device)
        coarse = self.reals[first - 1]
        if augment and self.config.augment:
            coarse = augment_coarse(coarse, self.state.rng)
        return resize(coarse, self.geometry.sizes[first])

    def _reconstruction_input(self) -> torch.Tensor:
        first, scale = self.state.first_scale, self.scale
        x = self._base(augment=False)
        if scale == first:
            return x
        with torch.no_grad():
            pyramid = GeneratorPyramid(self.state.generators, self.state.amplitudes, first)
            x = _reconstruct(pyramid, x, self.geometry.sizes, first, scale - 1, self.state.reconstruction_noise)
        return resize(x, self.geometry.sizes[scale])

    def _fake_input(self) -> torch.Tensor:
        first, scale = self.state.first_scale, self.scale
        x = self._base(augment=True)
        if scale > first:
            with torch.no_grad():
                x = self.frozen.run(x, self.geometry.sizes, first, scale - 1, self._noise)
        return resize(x, self.geometry.sizes[scale])

    def _lr_scale(self) -> float:
        return 0.1 if self.state.iteration >= self.config.lr_decay_at * self.config.iterations else 1.0

    def _crop_window(self) -> tuple[slice, ...]:
        height, width = self.real.shape[-2:]
        size = self.config.crop_size
        if size is None or (height <= size and width <= size):
            return (slice(None),) * 4
        top = int(torch.randint(0, max(height - size, 0) + 1, (), generator=self.state.rng))
        left = int(torch.randint(0, max(width - size, 0) + 1, (), generator=self.state.rng))
        return (slice(None), slice(None), slice(top, top + size), slice(left, left + size))

    def step(self) -> dict[str, float]:
        config = self.config
        for optimizer in (self.opt_g, self.opt_d):
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * self._lr_scale()
        coarse = self._fake_input()
        window = self._crop_window()
        coarse, real = coarse[window], self.real[window]
        reconstruction_input = self.reconstruction_input[window]
        reconstruction_noise = 0.0
        if self.reconstruction_noise is not None:
            reconstruction_noise = self.amplitude * self.reconstruction_noise[window]
        shape = tuple(coarse.shape)
        for critic_step in range(config.critic_steps):
            fake = self.generator(coarse, self.amplitude * self._noise(shape)).detach()
            loss_d = self.critic(fake).mean() - self.critic(real).mean()
            step_index = self.state.iteration * config.critic_steps + critic_step
            if config.lambda_gp > 0 and step_index % config.gp_every == 0:
                loss_d = loss_d + config.lambda_gp * config.gp_every * _gradient_penalty(
                    self.critic, real, fake, self.state.rng)
            self.opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            self.opt_d.step()
        for _ in range(config.generator_steps):
            fake = self.generator(coarse, self.amplitude * self._noise(shape))
            reconstruction = F.mse_loss(self.generator(reconstruction_input, reconstruction_noise), real)
            loss_g = -self.critic(fake).mean() + config.alpha * reconstruction
            if config.restoration_weight > 0:
                corrupted, region = corrupt_region(reconstruction_input, self.state.rng)
                restored = self.generator(corrupted, reconstruction_noise, region)
                # Mean over the re-mapped region (elsewhere the reconstruction loss already acts).
                restoration = (((restored - real) ** 2) * region).sum() / region.sum().clamp_min(1.0)
                loss_g = loss_g + config.restoration_weight * restoration
            self.opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            self.opt_g.step()
        self.last_losses = {"critic": loss_d.item(), "generator": loss_g.item(), "reconstruction": reconstruction.item()}
        if config.restoration_weight > 0:
            self.last_losses["restoration"] = restoration.item()
        return self.last_losses

    def finish(self) -> dict[str, Any]:
        generator = self.generator.requires_grad_(False).eval()
        rec_rmse = self._reconstruction_rmse()
        with torch.no_grad():
            input_rmse = torch.sqrt(F.mse_loss(self.reconstruction_input, self.real)).item()
        self.state.generators.append(generator)
        self.state.amplitudes.append(self.amplitude)
        self.state.scale += 1
        self.state.iteration = 0
        return {
            "scale": self.scale,
            "size": list(self.geometry.sizes[self.scale]),
            "noise_amplitude": self.amplitude,
            "reconstruction_rmse": rec_rmse,
            "initial_reconstruction_rmse": self.initial_rmse,
            "upsampled_input_rmse": input_rmse,
            **scale_health(self.scale, rec_rmse, input_rmse),
            **{f"final_{k}_loss": v for k, v in self.last_losses.items()},
        }


class SmallSliceWarning(UserWarning):
    """The slice has too few scales for the harmonization mode: the pyramid is trained from noise."""


class TrainingHealthWarning(UserWarning):
    """A trained scale reconstructs its real slice worse than its plain upsampled input did."""


def scale_health(scale: int, reconstruction_rmse: float, input_rmse: float) -> dict[str, Any]:
    """Health of one trained scale: does its generator improve on the upsampled coarser image?

    A scale is healthy when :math:`\\mathrm{RMSE}(G_s(x^{rec}_s), x_s) <
    \\mathrm{RMSE}(x^{rec}_s, x_s)`, i.e. running its generator brings the reconstruction closer
    to the real slice than the upsampled reconstruction of the coarser scales alone (for a scale
    trained from pure noise, scale 0 of the ``reference`` preset, that input is zeros). An
    unhealthy scale is flagged in the training log (``"healthy": false``) and
    reported with a :class:`TrainingHealthWarning`: harmonizing through it degrades the image.

    Returns:
        ``{"healthy": bool, "improvement": input_rmse / reconstruction_rmse}`` (``None`` for a
        perfect reconstruction).
    """
    improvement = input_rmse / reconstruction_rmse if reconstruction_rmse > 0 else None
    healthy = bool(reconstruction_rmse < input_rmse)
    if not healthy:
        warnings.warn(
            f"Scale {scale} reconstructs the training slice worse than its upsampled input "
            f"(RMSE {reconstruction_rmse:.4f} vs {input_rmse:.4f}): harmonizing from or through this "
            "scale degrades the image. Train longer (iterations), with another seed, or start "
            "harmonization above it.", TrainingHealthWarning, stacklevel=2)
    return {"healthy": healthy, "improvement": None if improvement is None else float(improvement)}


def _gradient_penalty(critic, real, fake, rng) -> torch.Tensor:
    mix = torch.rand((real.shape[0], 1, 1, 1), generator=rng).to(real.device)
    interpolated = (mix * real + (1 - mix) * fake).requires_grad_(True)
    score = critic(interpolated)
    (gradient,) = torch.autograd.grad(score.sum(), interpolated, create_graph=True)
    return ((gradient.norm(2, dim=1) - 1) ** 2).mean()


def _reconstruct(pyramid, base, sizes, start, stop, reconstruction_noise):
    """The deterministic reconstruction path: fixed noise at scale 0, none elsewhere."""
    x = base
    for scale in range(start, stop + 1):
        x = resize(x, sizes[scale])
        noise = 0.0
        if scale == 0 and reconstruction_noise is not None:
            noise = pyramid.amplitude(0) * reconstruction_noise
        x = pyramid.generator(scale)(x, noise)
    return x


def augment_coarse(image: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Harmonization-mode augmentation of the coarse input (see the module docstring).

    Random flips, a global intensity jitter, and one to three patches copied from elsewhere in
    the slice with a random contrast factor in [0.5, 1.5] and soft edges: foreign content that
    the generators must learn to blend in.
    """
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=rng).item()

    x = image
    if uniform(0, 1) < 0.5:
        x = x.flip(-1)
    if uniform(0, 1) < 0.5:
        x = x.flip(-2)
    x = x * uniform(0.9, 1.1) + uniform(-0.1, 0.1)
    height, width = x.shape[-2:]
    yy = torch.arange(height, device=x.device).view(-1, 1).float()
    xx = torch.arange(width, device=x.device).view(1, -1).float()
    for _ in range(int(uniform(1, 4))):
        radius = uniform(0.08, 0.25) * min(height, width)
        src = (uniform(radius, height - radius), uniform(radius, width - radius))
        dst = (uniform(radius, height - radius), uniform(radius, width - radius))
        shift = (round(dst[0] - src[0]), round(dst[1] - src[1]))
        moved = torch.roll(x, shifts=shift, dims=(-2, -1))
        distance = torch.sqrt((yy - dst[0]) ** 2 + (xx - dst[1]) ** 2)
        weight = torch.clamp((radius - distance) / max(radius * 0.3, 1.0), 0, 1)
        contrast = uniform(0.5, 1.5)
        mean = moved.mean()
        patch = (moved - mean) * contrast + mean
        x = x * (1 - weight) + patch * weight
    return x.clamp(-1, 1)


REMAPS = ("dim", "brighten", "invert", "flatten", "blur")


def corrupt_region(image: torch.Tensor, rng: torch.Generator, remap: str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-map the intensities of one random soft disk of ``image`` (model units); returns it and the mask.

    The disk (radius 8-25 % of the short side) is ``"dim"`` (towards -1 by a factor in
    [0.3, 0.8]), ``"brighten"`` (away from -1 by [1.2, 1.8]), ``"invert"`` (about its mean),
    ``"flatten"`` (deviations from its mean x 0.3) or ``"blur"`` (Gaussian, sd 1.5 px); a random
    one of :data:`REMAPS` unless ``remap`` is given. Each keeps the region's internal structure
    (its ranks, or for blur its coarse layout), so undoing it is a correction, not inpainting.
    """
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand((), generator=rng).item()

    height, width = image.shape[-2:]
    kind = remap or REMAPS[int(torch.randint(0, len(REMAPS), (), generator=rng))]
    if kind not in REMAPS:
        raise SinganInsertError(f"Unknown remap {kind!r}; choose one of {REMAPS}.")
    radius = uniform(0.08, 0.25) * min(height, width)
    centre = (uniform(radius, height - radius), uniform(radius, width - radius))
    yy = torch.arange(height, device=image.device).view(-1, 1).float()
    xx = torch.arange(width, device=image.device).view(1, -1).float()
    distance = torch.sqrt((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2)
    weight = torch.clamp((radius - distance) / max(radius * 0.2, 1.0), 0, 1)[None, None]
    mean = (image * weight).sum() / weight.sum().clamp_min(1e-6)
    if kind == "dim":
        remapped = -1 + (image + 1) * uniform(0.3, 0.8)
    elif kind == "brighten":
        remapped = -1 + (image + 1) * uniform(1.2, 1.8)
    elif kind == "invert":
        remapped = 2 * mean - image
    elif kind == "flatten":
        remapped = mean + 0.3 * (image - mean)
    else:
        kernel = torch.exp(-torch.arange(-4, 5, device=image.device).float() ** 2 / (2 * 1.5 ** 2))
        kernel = kernel / kernel.sum()
        padded = F.pad(image, (4, 4, 4, 4), mode="reflect")
        remapped = F.conv2d(F.conv2d(padded, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
    corrupted = (image * (1 - weight) + remapped.clamp(-1, 1) * weight)
    return corrupted, (weight > 0.5).to(image.dtype).expand(image.shape[0], 1, -1, -1)


def restoration_error(harmonizer, seed: int = 0, num: int = 20) -> float:
    """Mean RMSE, inside the re-mapped region, of the finest generator restoring :func:`corrupt_region`s.

    The input is the model's stored training slice at the finest scale, downsampled to the scale
    below and back (what that generator receives in a reconstruction); ``num`` seeded
    corruptions. Models without the mask channel get the same inputs without the mask.
    """
    if harmonizer.training_slice is None:
        raise SinganInsertError("This model file stores no training slice; retrain it to measure restoration.")
    sizes = harmonizer.geometry.sizes
    real = harmonizer.training_slice[None, None].to(harmonizer.device)
    coarse = resize(resize(real, sizes[-2]), sizes[-1])
    generator = harmonizer.pyramid.generator(harmonizer.num_scales - 1)
    rng = torch.Generator().manual_seed(seed)
    errors = []
    with torch.no_grad():
        for _ in range(num):
            corrupted, region = corrupt_region(coarse, rng)
            restored = generator(corrupted, 0.0, region if generator.mask_channel else None)
            inside = region[0, 0] > 0
            errors.append(torch.sqrt(((restored - real)[0, 0][inside] ** 2).mean()).item())
    return float(np.mean(errors))


#: Narrowest tile of the per-scale figure, in pixels (smaller scales are enlarged to it).
LABELLED_TILE_WIDTH = 96


def _write_sample_figure(path: Path, state: _TrainingState, reals, geometry, scale: int) -> None:
    """Labelled PNG strip at ``scale``: real | reconstruction | 3 random samples."""
    first = state.first_scale
    pyramid = GeneratorPyramid(state.generators, state.amplitudes, first)
    device = reals[0].device
    with torch.no_grad():
        base = torch.zeros((1, 1, *geometry.sizes[0]), device=device) if first == 0 else \
            resize(reals[first - 1], geometry.sizes[first])
        rec = _reconstruct(pyramid, base, geometry.sizes, first, scale, state.reconstruction_noise)
        rng = torch.Generator().manual_seed(1234)
        samples = []
        for _ in range(3):
            start = base if first == 0 else resize(augment_coarse(reals[first - 1], rng), geometry.sizes[first])
            samples.append(pyramid.run(start, geometry.sizes, first, scale,
                                       lambda shape: torch.randn(shape, generator=rng).to(device)))
    tiles = [reals[scale], rec, *samples]
    row = torch.cat([t[0, 0].cpu() for t in tiles], dim=1)
    image = ((row.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    width = tiles[0].shape[-1]
    # Coarse scales are a few dozen pixels wide: enlarged (pixels kept square and sharp) so that
    # each tile holds its label ("reconstruction" is ~85 px in Pillow's default font).
    zoom = max(1, -(-LABELLED_TILE_WIDTH // width))
    image = np.kron(image, np.ones((zoom, zoom), dtype=image.dtype))
    width *= zoom
    image = _labelled(image, [(0, "real"), (width, "reconstruction"), (2 * width, "samples")])
    atomic_write_png(path, image)


def _labelled(image: np.ndarray, labels: list[tuple[int, str]], band: int = 14) -> np.ndarray:
    """``image`` (uint8, H x W) under a black band with white ``(x, text)`` labels (Pillow's font)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (image.shape[1], image.shape[0] + band), 0)
    canvas.paste(Image.fromarray(image), (0, band))
    draw = ImageDraw.Draw(canvas)
    for x, text in labels:
        draw.text((x + 2, 1), text, fill=255)
    return np.asarray(canvas)
