"""VA-VAE losses (reference §1.2, §1.3): L1 + LPIPS reconstruction NLL, KL, hinge PatchGAN with the
adaptive weight, and the VF (vision-foundation alignment) loss with its adaptive weight.

This is a loss layer: :class:`VAVAELoss` computes the autoencoder objective and the discriminator
objective and returns every term for logging; the trainer owns the models, engines and optimizers.

Total autoencoder loss (§1.3):  nll + kl_weight·KL + d_weight·disc_factor·g + w_vf·vf, where
    nll = Σ_{C,H,W}(rec / exp(logvar) + logvar) / B,  rec = |x − x̂| + perceptual_weight·LPIPS(x, x̂),
    KL = Σ_b KL_b / B,  g = −mean D(x̂),
    d_weight = clamp(‖∇_W nll‖ / (‖∇_W g‖ + 1e-4), 0, 1e4)·disc_weight at W = decoder.conv_out.weight,
    w_vf = clamp(‖∇_W nll‖ / (‖∇_W vf‖ + 1e-4), 0, 1e8)·vf_weight at W = encoder.conv_out.weight (§1.2).
Discriminator loss: disc_factor·0.5·(mean ReLU(1 − D(x)) + mean ReLU(1 + D(x̂))) on detached x̂.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.foundation import FoundationModel
from models.lpips import LPIPS
from models.vavae import DiagonalGaussianDistribution


@dataclass
class VAVAELossArgs:
    """Loss weights and schedule. Defaults are the reference 50-epoch f16d32 + DINOv2 run (§1.2–1.4)."""

    perceptual_weight: float = 1.0
    """Weight of LPIPS inside the per-pixel reconstruction term (§1.3: 1.0)."""
    kl_weight: float = 1e-6
    """Weight of the KL term (§1.3: 1e-6; calibrated against the sum-over-pixels NLL reduction)."""
    logvar_init: float = 0.0
    """The NLL's scalar logvar; the reference never optimises it, so it stays at its init 0 (§1.3)."""
    disc_start: int = 5001
    """First global_step at which the GAN terms are on; adopt_weight gives 0 before (§1.4: 5001; stages 2-3: 1)."""
    disc_factor: float = 1.0
    """Multiplier of the GAN terms once started (§1.3: 1.0)."""
    disc_weight: float = 0.5
    """Multiplier of the adaptive GAN weight (§1.3: 0.5)."""
    use_vf: bool = True
    """Add the VF loss (needs a foundation model); False gives the plain LDM autoencoder loss."""
    vf_weight: float = 0.1
    """Multiplier of the VF loss weight, w_hyper (§1.2: 0.1; 0.5 in the released run's stage 1)."""
    adaptive_vf: bool = True
    """Scale the VF loss by ‖∇nll‖/‖∇vf‖ at encoder.conv_out.weight (§1.2); False uses vf_weight alone."""
    distmat_margin: float = 0.25
    """Margin m2 of the marginal distance-matrix similarity (§1.2: 0.25)."""
    cos_margin: float = 0.5
    """Margin m1 of the marginal cosine similarity (§1.2: 0.5)."""
    distmat_weight: float = 1.0
    """Weight of the distance-matrix term inside the VF loss (§1.2: 1.0)."""
    cos_weight: float = 1.0
    """Weight of the cosine term inside the VF loss (§1.2: 1.0)."""
    proj_fix: bool = False
    """Freeze the VF projection (the reference's proj_fix, §1.2); default trains it with the autoencoder."""


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` while global_step < threshold, else ``weight`` (taming ``adopt_weight``, §1.3)."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5·(mean ReLU(1 − D(x)) + mean ReLU(1 + D(x̂))) (§1.3)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """g = −mean D(x̂) (§1.3)."""
    return -logits_fake.mean()


def reconstruction_nll(
    inputs: torch.Tensor,
    reconstructions: torch.Tensor,
    p_loss: torch.Tensor | None,
    logvar: torch.Tensor,
    perceptual_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (nll, rec) with rec (B, C, H, W) = |x − x̂| + perceptual_weight·p_loss (p_loss (B,1,1,1)
    broadcast to every pixel) and nll = Σ(rec / exp(logvar) + logvar) / B (§1.3)."""
    rec = torch.abs(inputs - reconstructions)  # (B, C, H, W)
    if p_loss is not None and perceptual_weight > 0:
        rec = rec + perceptual_weight * p_loss
    nll = rec / torch.exp(logvar) + logvar
    return nll.sum() / nll.shape[0], rec


def kl_loss(posterior: DiagonalGaussianDistribution) -> torch.Tensor:
    """Σ_b KL(q(z|x_b) ‖ N(0, I)) / B (§1.3)."""
    kl = posterior.kl()  # (B,)
    return kl.sum() / kl.shape[0]


def vf_loss_terms(
    z_proj: torch.Tensor, features: torch.Tensor, distmat_margin: float, cos_margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_mdms, L_mcos) of §1.2 for projected latents and foundation features, both (B, C, h, w).

    L_mdms = mean_{b,i,j} ReLU(|ẑ_iᵀẑ_j − f̂_iᵀf̂_j| − m2) with ẑ, f̂ unit vectors over channels;
    L_mcos = mean_{b,i} ReLU(1 − m1 − cos(f_i, z_i)).
    """
    if z_proj.shape != features.shape:
        raise ValueError(
            f"VF loss needs projected latents and foundation features of one shape, got {tuple(z_proj.shape)} "
            f"and {tuple(features.shape)}: set the foundation resize so its token grid equals the latent grid"
        )
    z = F.normalize(z_proj.flatten(2), dim=1)  # (B, C, N)
    f = F.normalize(features.flatten(2), dim=1)  # (B, C, N)
    sim_z = torch.einsum("bci,bcj->bij", z, z)  # (B, N, N)
    sim_f = torch.einsum("bci,bcj->bij", f, f)  # (B, N, N)
    mdms = F.relu(torch.abs(sim_z - sim_f) - distmat_margin).mean()
    mcos = F.relu(1.0 - cos_margin - F.cosine_similarity(features, z_proj, dim=1, eps=1e-8)).mean()
    return mdms, mcos


def adaptive_weight(
    numerator_loss: torch.Tensor, denominator_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float
) -> torch.Tensor:
    """clamp(‖∇_W numerator‖ / (‖∇_W denominator‖ + 1e-4), 0, max_weight), detached (§1.2, §1.3).

    Uses ``torch.autograd.grad`` with ``retain_graph=True``: no ``.grad`` is touched.
    """
    g_num = torch.autograd.grad(numerator_loss, last_layer, retain_graph=True)[0]
    g_den = torch.autograd.grad(denominator_loss, last_layer, retain_graph=True)[0]
    w = torch.norm(g_num) / (torch.norm(g_den) + 1e-4)
    return torch.clamp(w, 0.0, max_weight).detach()


class VAVAELoss(nn.Module):
    """The reference ``LPIPSWithDiscriminator`` + VF loss (§1.2, §1.3) as one loss module.

    Holds the frozen LPIPS, the frozen foundation model, the trainable VF projection ``linear_proj``
    (Conv2d(z_channels, foundation dim, 1, bias=False), trained with the autoencoder's optimizer unless
    ``proj_fix``) and the fixed scalar ``logvar``. The discriminator is passed in by the trainer, which
    owns its engine and optimizer.

    Note for the trainer: :meth:`autoencoder_loss` backpropagates g through the discriminator, so the
    discriminator's ``.grad`` must be zeroed before its own step (the reference zeroes it).
    """

    def __init__(
        self,
        args: VAVAELossArgs,
        perceptual: LPIPS | None,
        foundation: FoundationModel | None = None,
        latent_channels: int = 32,
    ) -> None:
        super().__init__()
        self.args = args
        if args.perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs an LPIPS module (models.lpips.LPIPS)")
        if args.use_vf and foundation is None:
            raise ValueError("use_vf=True needs a foundation model (models.foundation.FoundationModel)")
        self.perceptual_loss = perceptual
        self.foundation_model = foundation if args.use_vf else None
        # the reference registers logvar as a Parameter that no optimizer holds (§1.3); a buffer says so
        self.register_buffer("logvar", torch.full((), float(args.logvar_init)))
        if self.foundation_model is not None:
            self.linear_proj = nn.Conv2d(latent_channels, self.foundation_model.dim, 1, bias=False)
            self.linear_proj.requires_grad_(not args.proj_fix)
        else:
            self.linear_proj = None

    def vf_loss(
        self, z: torch.Tensor, inputs: torch.Tensor, features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(vf, mdms, mcos) for sampled latents z (B, z_ch, h, w) and images (B, 3, H, W) in [-1, 1].

        ``features`` (B, C, h, w) may be given to skip the foundation forward (e.g. cached features).
        """
        if self.foundation_model is None or self.linear_proj is None:
            raise RuntimeError("this VAVAELoss was built with use_vf=False")
        if features is None:
            features = self.foundation_model(inputs)  # (B, C, h, w), no grad
        z_proj = self.linear_proj(z)  # (B, C, h, w)
        a = self.args
        mdms, mcos = vf_loss_terms(z_proj, features, a.distmat_margin, a.cos_margin)
        return a.distmat_weight * mdms + a.cos_weight * mcos, mdms, mcos

    def autoencoder_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posterior: DiagonalGaussianDistribution,
        z: torch.Tensor,
        global_step: int,
        discriminator: nn.Module | None,
        encoder_last_layer: torch.Tensor | None,
        decoder_last_layer: torch.Tensor | None,
        features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total autoencoder loss and its terms (all detached scalars) for logging.

        Args:
            inputs, reconstructions: (B, 3, H, W) in [-1, 1].
            posterior, z: the encoder posterior and the sampled latent that was decoded (§1.2).
            global_step: compared with disc_start (adopt_weight).
            discriminator: the PatchGAN; may be None only while the GAN is off (global_step < disc_start).
            encoder_last_layer: ``autoencoder.encoder.conv_out.weight`` (VF adaptive weight).
            decoder_last_layer: ``autoencoder.decoder.conv_out.weight`` (GAN adaptive weight).
            features: optional precomputed foundation features for the VF loss.

        Adaptive weights need autograd; under ``torch.no_grad`` (validation) they are 0, like the
        reference's fallback for d_weight. d_weight is only computed while disc_factor > 0 (it multiplies
        a zero otherwise) and is logged as 0 before disc_start.
        """
        a = self.args
        grad_ok = torch.is_grad_enabled()
        p_loss = None
        if self.perceptual_loss is not None and a.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs, reconstructions)  # (B, 1, 1, 1)
        nll, rec = reconstruction_nll(inputs, reconstructions, p_loss, self.logvar, a.perceptual_weight)
        kl = kl_loss(posterior)
        zero = nll.new_zeros(())
        total = nll + a.kl_weight * kl

        disc_factor = adopt_weight(a.disc_factor, global_step, threshold=a.disc_start)
        g, d_weight = zero, zero
        if discriminator is not None:
            g = generator_loss(discriminator(reconstructions))
            if disc_factor > 0.0 and grad_ok and decoder_last_layer is not None:
                d_weight = adaptive_weight(nll, g, decoder_last_layer, 1e4) * a.disc_weight
            total = total + d_weight * disc_factor * g
        elif disc_factor > 0.0:
            raise ValueError(
                f"global_step {global_step} >= disc_start {a.disc_start} needs the discriminator"
            )

        vf, mdms, mcos, vf_w = zero, zero, zero, zero
        if self.foundation_model is not None:
            vf, mdms, mcos = self.vf_loss(z, inputs, features)
            if not a.adaptive_vf:
                vf_w = nll.new_tensor(a.vf_weight)
            elif grad_ok and encoder_last_layer is not None:
                vf_w = adaptive_weight(nll, vf, encoder_last_layer, 1e8) * a.vf_weight
            total = total + vf_w * vf

        logs = {
            "total": total,
            "nll": nll,
            "rec": rec.mean(),
            "l1": torch.abs(inputs - reconstructions).mean(),
            "p": p_loss.mean() if p_loss is not None else zero,
            "kl": kl,
            "logvar": self.logvar,
            "g": g,
            "d_weight": d_weight,
            "disc_factor": nll.new_tensor(disc_factor),
            "vf": vf,
            "vf_mdms": mdms,
            "vf_mcos": mcos,
            "vf_weight": vf_w,
        }
        return total, {k: v.detach().clone() for k, v in logs.items()}

    def discriminator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        global_step: int,
        discriminator: nn.Module,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """disc_factor·hinge(D(x), D(x̂)) on detached inputs and reconstructions, two separate D calls
        (each its own BatchNorm batch, as the reference) (§1.3)."""
        logits_real = discriminator(inputs.detach())  # (B, 1, h', w')
        logits_fake = discriminator(reconstructions.detach())
        disc_factor = adopt_weight(self.args.disc_factor, global_step, threshold=self.args.disc_start)
        d_loss = disc_factor * hinge_d_loss(logits_real, logits_fake)
        logs = {
            "disc_loss": d_loss,
            "logits_real": logits_real.mean(),
            "logits_fake": logits_fake.mean(),
            "disc_factor": d_loss.new_tensor(disc_factor),
        }
        return d_loss, {k: v.detach().clone() for k, v in logs.items()}
