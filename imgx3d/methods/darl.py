"""DARL (Kim et al., ICLR 2023): self-supervised vessel segmentation, per slice, without labels.

Three unpaired inputs: images with vessels ``A`` (the training slices; their labels are never
read), vessel-free backgrounds ``B`` and synthetic vessel masks ``F``. Here ``F`` comes from the
toolkit's fractal generator (:func:`imgx3d.data.vessels.fractal_vessels`) and ``B`` from
``A`` itself by a grey-level closing wider than the vessels (``background: closing``), or
from a folder of vessel-free frames (``background: folder``, e.g. pre-contrast angiograms).

- a diffusion module ``eps_theta`` (MONAI ``DiffusionModelUNet``), T = 2000, linear 1e-6 → 1e-2;
- a generator ``G`` of switchable-SPADE residual blocks (:mod:`imgx3d.nets.spade_generator`),
  fed ``[x_t, eps_theta(x_t, t)]``;
- path A (segmentation): ``A`` noised at ``t_a ∈ [0, 200)``, ``G`` without mask → vessel map;
- path B (synthesis): ``B`` noised at ``t_b ∈ [0, T)``, ``G`` modulated by ``F`` → fake angiogram;
- cycle: the fake angiogram re-noised at path A's ``t_a`` with the step's one ``eps`` (the
  authors' code shares it between the paths) and segmented through path A, L1 to ``F``;
- two PatchGAN discriminators (MONAI ``PatchDiscriminator``): ``D_a`` images vs real ``A``,
  ``D_s`` vessel maps vs ``F``; LSGAN losses, image pools of 50.
``L_G = L_diff + 0.2·L_adv + 5·L_cyc`` (parameter group ``generator``: eps_theta and G) and the
discriminators' loss (group ``discriminator``) are returned together; the generic trainer
steps each group's optimiser from its own loss.
Inference: one step at t = 0 through path A; ``polyphase: true`` runs the four polyphase
sub-images of a slice (e.g. 512² → 4 × 256², the training size) and interleaves them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet, PatchDiscriminator
from torch import nn

from imgx3d.config import MethodConfig, ScheduleConfig, schedule_field
from imgx3d.data.geometry import to_slice_range, volume_to_slices
from imgx3d.data.io import IMAGE_SUFFIXES, read_volume
from imgx3d.data.vessels import fractal_vessels, remove_vessels
from imgx3d.diffusion.schedule import DiffusionSchedule, schedule_of
from imgx3d.errors import ConfigError, InputError
from imgx3d.methods.base import Method, TrainingPlan, Window
from imgx3d.nets.boundary import float32_outputs
from imgx3d.nets.spade_generator import SwitchableSPADEGenerator
from imgx3d.registry import register


@dataclass
class DARLConfig(MethodConfig):
    """Hyperparameters of the ``darl`` method.

    Attributes:
        diffusion_channels, diffusion_attention, num_res_blocks, norm_groups: eps_theta.
        generator_channels, generator_blocks, generator_downsamples, spade_hidden: G.
        discriminator_channels, discriminator_layers: each PatchGAN.
        schedule: the chain (T = 2000, linear 1e-6 → 1e-2).
        t_a_max: path A noise levels ``t_a ∈ [0, t_a_max)``.
        adv_weight, cycle_weight: alpha = 0.2 and beta = 5 of ``L_G``.
        pool_size: fakes remembered for the discriminators (CycleGAN image pool).
        background: ``closing`` (made from A) or ``folder`` (``background_dir``).
        closing_window: closing window in pixels of the training slices (wider than vessels).
        dark_vessels: vessels darker than the background (fundus green channel, X-ray); False: brighter.
        fractal_bank: fractal masks drawn once (seeded) and sampled per batch.
        fractal_trees, fractal_depth, fractal_width: the fractal masks' trees per mask, branching
            depth and starting width range in pixels of the training slices.
        polyphase: train on one random polyphase sub-image per batch; infer on all four, interleaved.
        seed: seed of the fractal bank.
    """

    name: str = "darl"
    diffusion_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    diffusion_attention: list[bool] = field(default_factory=lambda: [False, False, False])
    num_res_blocks: int = 1
    norm_groups: int = 16
    generator_channels: int = 32
    generator_blocks: int = 4
    generator_downsamples: int = 2
    spade_hidden: int = 64
    discriminator_channels: int = 32
    discriminator_layers: int = 3
    schedule: ScheduleConfig = schedule_field("linear", 2000, 1e-6, 1e-2)
    t_a_max: int = 200
    adv_weight: float = 0.2
    cycle_weight: float = 5.0
    pool_size: int = 50
    background: Literal["closing", "folder"] = "closing"
    background_dir: str = ""
    closing_window: int = 15
    dark_vessels: bool = True
    fractal_bank: int = 256
    fractal_trees: int = 2
    fractal_depth: int = 6
    fractal_width: list[float] = field(default_factory=lambda: [2.0, 6.0])
    polyphase: bool = False
    seed: int = 0


class ImagePool(nn.Module):
    """CycleGAN's history of fakes: each query returns, per sample, the new fake or (half the
    time, once full) a stored one that the new fake replaces. Kept in the state dict for resume
    (on the CPU); a stored image is moved to the device and dtype of the fakes it is mixed with,
    so a pool restored after the method moved to a GPU serves GPU tensors."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.images = size, []

    def query(self, fakes: torch.Tensor) -> torch.Tensor:
        out = []
        for fake in fakes.detach():
            if len(self.images) < self.size:
                self.images.append(fake.clone())
                out.append(fake)
            elif torch.rand(()) < 0.5:
                i = int(torch.randint(len(self.images), ()))
                out.append(self.images[i].to(fake, copy=True))
                self.images[i] = fake.clone()
            else:
                out.append(fake)
        return torch.stack(out)

    def get_extra_state(self) -> Any:
        return [image.cpu() for image in self.images]

    def set_extra_state(self, state: Any) -> None:
        self.images = list(state)


def _lsgan(prediction: list[torch.Tensor] | torch.Tensor, real: bool) -> torch.Tensor:
    out = prediction[-1] if isinstance(prediction, list) else prediction
    return F.mse_loss(out, torch.full_like(out, 1.0 if real else 0.0))


def polyphase_split(x: torch.Tensor) -> list[torch.Tensor]:
    """The four polyphase components ``x[..., i::2, j::2]`` of ``(B, C, H, W)`` (H, W even)."""
    return [x[..., i::2, j::2] for i in (0, 1) for j in (0, 1)]


def polyphase_merge(parts: list[torch.Tensor]) -> torch.Tensor:
    """Interleave four polyphase components back into one ``(B, C, 2h, 2w)`` tensor."""
    b, c, h, w = parts[0].shape
    out = parts[0].new_empty(b, c, 2 * h, 2 * w)
    for k, (i, j) in enumerate((i, j) for i in (0, 1) for j in (0, 1)):
        out[..., i::2, j::2] = parts[k]
    return out


@register
class DARLMethod(Method):
    """Label-free vessel segmentation by diffusion adversarial representation learning."""

    name = "darl"
    spatial_dims = 2
    plan = TrainingPlan(uses_labels=False)  # self-supervised: training never reads label files
    Config = DARLConfig

    def __init__(self, cfg: DARLConfig, num_classes: int, in_channels: int):
        super().__init__(cfg, num_classes, in_channels)
        if num_classes != 2:
            raise ConfigError(f"method 'darl' segments vessels vs background (2 classes), the data has {num_classes}")
        if in_channels != 1:
            raise ConfigError("method 'darl' works on one channel; set data.color: green (fundus) or grey")
        if cfg.background == "folder" and not cfg.background_dir:
            raise ConfigError("method.background: folder needs method.background_dir (vessel-free images)")
        if len(cfg.diffusion_attention) != len(cfg.diffusion_channels):
            raise ConfigError("config key 'method.diffusion_attention' needs one entry per method.diffusion_channels")
        self.eps_theta = DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1,
                                            channels=list(cfg.diffusion_channels),
                                            attention_levels=list(cfg.diffusion_attention),
                                            num_res_blocks=cfg.num_res_blocks, norm_num_groups=cfg.norm_groups,
                                            num_head_channels=cfg.diffusion_channels[-1])
        self.generator = SwitchableSPADEGenerator(2, 1, cfg.generator_channels, cfg.generator_downsamples,
                                                  cfg.generator_blocks, cfg.spade_hidden)
        self.d_image = PatchDiscriminator(spatial_dims=2, channels=cfg.discriminator_channels, in_channels=1,
                                          num_layers_d=cfg.discriminator_layers, norm="INSTANCE")
        self.d_mask = PatchDiscriminator(spatial_dims=2, channels=cfg.discriminator_channels, in_channels=1,
                                         num_layers_d=cfg.discriminator_layers, norm="INSTANCE")
        for net in (self.eps_theta, self.generator, self.d_image, self.d_mask):
            float32_outputs(net)
        self.pool_image, self.pool_mask = ImagePool(cfg.pool_size), ImagePool(cfg.pool_size)
        self.schedule: DiffusionSchedule = schedule_of(cfg.schedule)
        self._fractals: torch.Tensor | None = None  # drawn on the first batch, at its size
        self._backgrounds: torch.Tensor | None = None

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"generator": [*self.eps_theta.parameters(), *self.generator.parameters()],
                "discriminator": [*self.d_image.parameters(), *self.d_mask.parameters()]}

    # -- label-free inputs -----------------------------------------------------------------
    def _fractal_batch(self, n: int, size: tuple[int, int], device: torch.device) -> torch.Tensor:
        """``n`` masks in {-1, 1} from the seeded fractal bank (drawn once per slice size)."""
        if self._fractals is None or tuple(self._fractals.shape[-2:]) != size:
            rng = np.random.default_rng([self.cfg.seed, 4242])
            bank = [fractal_vessels(size, rng, self.cfg.fractal_trees, self.cfg.fractal_depth,
                                    tuple(self.cfg.fractal_width)) for _ in range(self.cfg.fractal_bank)]
            self._fractals = torch.from_numpy(np.stack(bank))[:, None].float() * 2 - 1
        index = torch.randint(len(self._fractals), (n,))
        return self._fractals[index].to(device)

    def _background_batch(self, images: torch.Tensor) -> torch.Tensor:
        if self.cfg.background == "closing":
            return remove_vessels(images, self.cfg.closing_window, self.cfg.dark_vessels)
        size = tuple(images.shape[-2:])
        if self._backgrounds is None or tuple(self._backgrounds.shape[-2:]) != size:
            folder = Path(self.cfg.background_dir)
            files = sorted(p for p in folder.glob("*") if p.name.lower().endswith(IMAGE_SUFFIXES)) \
                if folder.is_dir() else []
            if not files:
                raise InputError(f"{folder}: no background images (PNG/JPEG/TIFF/GIF/BMP); fix method.background_dir")
            volumes = [torch.from_numpy(read_volume(f).array[None].astype(np.float32)) for f in files]  # (1, H, W, 1)
            self._backgrounds = torch.cat([volume_to_slices(to_slice_range(v, [0.5, 99.5]), 2, size) for v in volumes])
        return self._backgrounds[torch.randint(len(self._backgrounds), (images.shape[0],))].to(images.device)

    # -- the two paths ---------------------------------------------------------------------
    def _path(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise x0 at t with ``noise``, estimate the noise, run G (with ``mask``: synthesis; without:
        segmentation). Returns (G's output, the noise estimate)."""
        x_t = self.schedule.q_sample(x0, t, noise).float()
        eps = self.eps_theta(x_t, t)
        return self.generator(torch.cat([x_t, eps], 1), mask), eps

    def size_multiple(self) -> int:
        """The diffusion module's downsampling (the segmenter's sides follow the same slices)."""
        return 2 ** (len(self.cfg.diffusion_channels) - 1)

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        images = batch["image"]  # A; batch["label"] is never used
        if self.cfg.polyphase:
            images = polyphase_split(images)[int(torch.randint(4, ()))]
        n, device = images.shape[0], images.device
        masks = self._fractal_batch(n, tuple(images.shape[-2:]), device)  # F
        backgrounds = self._background_batch(images)  # B
        # One eps per step for every path, and the cycle re-noised at path A's t_a, as the authors'
        # p_losses does (boahK/DARL, model/ddpm_modules/diffusion_seg.py): the cycle then asks G to
        # segment a fake angiogram at exactly the noise level and noise of the real one.
        noise = torch.randn_like(images)
        t_b = torch.randint(0, self.schedule.num_steps, (n,), device=device)
        fake_images, eps_b = self._path(backgrounds, t_b, noise, masks)
        loss_diff = F.mse_loss(eps_b, noise)
        t_a = torch.randint(0, self.cfg.t_a_max, (n,), device=device)
        segmentation, _ = self._path(images, t_a, noise, None)
        cycled, _ = self._path(fake_images, t_a, noise, None)
        loss_cycle = F.l1_loss(cycled, masks)
        loss_adv = _lsgan(self.d_image(fake_images), True) + _lsgan(self.d_mask(segmentation), True)
        loss_g = loss_diff + self.cfg.adv_weight * loss_adv + self.cfg.cycle_weight * loss_cycle
        loss_d = 0.5 * (_lsgan(self.d_image(images), True) + _lsgan(self.d_image(self.pool_image.query(fake_images)), False)) \
            + 0.5 * (_lsgan(self.d_mask(masks), True) + _lsgan(self.d_mask(self.pool_mask.query(segmentation)), False))
        return {"loss/generator": loss_g, "loss/discriminator": loss_d, "diffusion": loss_diff.detach(),
                "cycle": loss_cycle.detach(), "adversarial": loss_adv.detach()}

    # -- inference -------------------------------------------------------------------------
    def segment(self, slices: torch.Tensor) -> torch.Tensor:
        """Vessel maps in [-1, 1]: one step at t = 0 through path A (no noise added)."""
        t = torch.zeros(slices.shape[0], dtype=torch.long, device=slices.device)
        return self.generator(torch.cat([slices, self.eps_theta(slices, t)], 1), None)

    def predict(self, image: torch.Tensor, window: Window) -> torch.Tensor:
        even = image.shape[-2] % 2 == 0 and image.shape[-1] % 2 == 0
        if self.cfg.polyphase and even:
            vessel = polyphase_merge([self.segment(part) for part in polyphase_split(image)])
        else:
            vessel = self.segment(image)
        p = ((vessel + 1) / 2).clamp(0, 1)
        return torch.cat([1 - p, p], 1)
