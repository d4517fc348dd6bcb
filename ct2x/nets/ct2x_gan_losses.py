"""Losses of CT2X-GAN (paper eqs. 8-12 and 16-19) and the two objectives they add up to.

Films are (N, 1, S, S) in [-1, 1]; style codes (N, w_dim); content maps (N, C, h, w); discriminator scores (N,).
Our readings where the paper's notation is loose: ||.||_2 in L_cc and L_sc (eqs. 10-11) is the mean squared
difference and ||.||_1 in L0 (eq. 12) the mean absolute value, both averaged over elements so that the weights do not
depend on sizes; in eq. 10 both content codes are of syntheses (the hats lost in the paper's typesetting, restored
from its Figure 3): L_cc = ||E_c(I^_X) - E_c(I^_DRR)||.

The LPIPS network is passed in, a callable (prediction, target) -> distances (any shape, averaged) on (N, 1, S, S)
films in [-1, 1]; the real one (the `lpips` package, AlexNet) needs a wrapper that repeats the grey channel to RGB.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ct2x.nets.config import JSONConfig
from ct2x.nets.ct2x_gan import DRR, XRAY, CT2XGANGenerator
from ct2x.nets.ct2x_gan_discriminator import PoseDiscriminator

Perceptual = Callable[[Tensor, Tensor], Tensor]  # LPIPS: (prediction, target) films -> distances
REAL_SAMPLES = ("drr", "xray")  # what the discriminator sees as real: CT2XGANLossConfig.real_samples


@dataclasses.dataclass(frozen=True)
class CT2XGANLossConfig(JSONConfig):
    """Weights of CT2X-GAN's loss terms and its loss switches. The paper gives no values; each default says whose."""

    adversarial: float = 1.0  # lambda_adv, eqs. 18-19: MUNIT's GAN weight (1)
    r1: float = 0.5  # lambda_R1, eq. 17: StyleGAN2-ADA's gamma = 1 at 256^2, whose penalty is gamma / 2 |grad|^2
    # R1 every r1_interval-th discriminator step, weighted by r1_interval (StyleGAN2's lazy regularisation, 16 there);
    # 1 = every step, as eq. 19 is written
    r1_interval: int = 1
    mae: float = 10.0  # lambda_mae, eq. 8: MUNIT's image reconstruction weight (10, an L1 loss too)
    lpips: float = 1.0  # lambda_lpips, eq. 8: ours
    content_consistency: float = 1.0  # lambda_cc, eq. 9: MUNIT's content reconstruction weight (1)
    style_consistency: float = 1.0  # lambda_sc, eq. 9: MUNIT's style reconstruction weight (1)
    zero: float = 1.0  # lambda_0, eq. 18: ours
    consistency: bool = True  # ablation "w/o L_consis" when False: no L_cc and no L_sc
    # Ours: True wraps the adversarial terms in softplus (StyleGAN2's non-saturating logistic loss); False is the
    # paper's literal, linear eqs. 16-17 (WGAN-like, unbounded without a constraint on D).
    non_saturating: bool = True
    # The discriminator's real samples. "drr" (the paper's eq. 17): the DRRs at the batch's poses, with their camera
    # labels. "xray" (ours): the batch's real films, with no pose (zero labels for the real films and the
    # syntheses alike, since real films are only PA or lateral), so that the adversarial term pulls the X-ray-style
    # synthesis towards real films rather than towards DRRs.
    real_samples: str = "drr"

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "real_samples":
                if value not in REAL_SAMPLES:
                    raise ValueError(f"{owner}.real_samples must be one of {', '.join(REAL_SAMPLES)}, got {value!r}")
            elif field.name in ("consistency", "non_saturating"):
                if not isinstance(value, bool):
                    raise ValueError(f"{owner}.{field.name} must be true or false, got {value!r}")
            elif field.name == "r1_interval":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{owner}.r1_interval must be a whole number >= 1, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{owner}.{field.name} must be a finite weight >= 0, got {value!r}")


def generator_adversarial(fake_scores: Tensor, non_saturating: bool = True) -> Tensor:
    """Eq. 16: E[-D(G(v, x, phi))], or E[softplus(-D(fake))] when non-saturating."""
    return F.softplus(-fake_scores).mean() if non_saturating else (-fake_scores).mean()


def discriminator_adversarial(real_scores: Tensor, fake_scores: Tensor, non_saturating: bool = True) -> Tensor:
    """Eq. 17 without R1: E[D(fake)] + E[-D(DRR)], or E[softplus(D(fake))] + E[softplus(-D(DRR))]."""
    if non_saturating:
        return F.softplus(fake_scores).mean() + F.softplus(-real_scores).mean()
    return fake_scores.mean() - real_scores.mean()


def r1_penalty(real_scores: Tensor, real_images: Tensor) -> Tensor:
    """Eq. 17's |grad D(x)|^2: the squared L2 norm of the scores' gradient with respect to each real film (which must
    require grad and have produced `real_scores`), averaged over the batch. Differentiable (for D's update)."""
    (gradient,) = torch.autograd.grad(real_scores.sum(), real_images, create_graph=True)  # (N, 1, S, S)
    return gradient.square().flatten(1).sum(dim=1).mean()


def reconstruction_loss(prediction: Tensor, target: Tensor, lpips: Perceptual, mae_weight: float,
                        lpips_weight: float) -> Tensor:
    """Eq. 8: lambda_mae MAE(I^_DRR, I_DRR) + lambda_lpips LPIPS(I^_DRR, I_DRR)."""
    return mae_weight * F.l1_loss(prediction, target) + lpips_weight * lpips(prediction, target).mean()


def content_consistency(content_xray: Tensor, content_drr: Tensor) -> Tensor:
    """Eq. 10: ||E_c(I^_X) - E_c(I^_DRR)||: the two syntheses share the CT's content."""
    return F.mse_loss(content_xray, content_drr)


def style_consistency(style_of_xray_synthesis: Tensor, xray_style: Tensor, style_of_drr_synthesis: Tensor,
                      drr_style: Tensor) -> Tensor:
    """Eq. 11: ||E_s^X(I^_X) - E_s^X(I_X)|| + ||E_s^DRR(I^_DRR) - E_s^DRR(I_DRR)||: each synthesis keeps the style it
    was made with."""
    return F.mse_loss(style_of_xray_synthesis, xray_style) + F.mse_loss(style_of_drr_synthesis, drr_style)


def zero_loss(xray_style_of_drr: Tensor, drr_style_of_xray: Tensor) -> Tensor:
    """Eq. 12: ||E_s^X(I_DRR)||_1 + ||E_s^DRR(I_X)||_1: a style branch sees no style in the other domain."""
    return xray_style_of_drr.abs().mean() + drr_style_of_xray.abs().mean()


class CT2XGANBatch(NamedTuple):
    """One training batch: CTs with a target pose each, the DRR there (ground truth) and unpaired real films."""

    ct: Tensor  # (N, 1, S, S, S) in [0, 1]
    label: Tensor  # (N, 25) camera labels of the target poses
    mip: Optional[Tensor]  # (N, 1, M, M) MIPs at those poses; None without pose attention
    drr: Tensor  # (N, 1, s, s) DRRs at those poses, in [-1, 1]
    xray: Tensor  # (N, 1, s, s) real X-ray films (style references, unpaired), in [-1, 1]


def syntheses(generator: CT2XGANGenerator, batch: CT2XGANBatch) -> Dict[str, Tensor]:
    """The X-ray-style and DRR-style syntheses (N, 1, s, s) of the batch's CTs at its poses and the style codes
    (N, w_dim) they were made with (the two syntheses are one film without a style encoder)."""
    content = generator.content_code(generator.encode_ct(batch.ct), batch.label, batch.mip)  # (N, L_c, w_dim)
    if generator.style_encoder is None:
        film = generator.synthesize(content)
        return {"xray_synthesis": film, "drr_synthesis": film}
    xray_style, drr_style = generator.style_code(batch.xray, XRAY), generator.style_code(batch.drr, DRR)
    return {"xray_synthesis": generator.synthesize(content, xray_style), "xray_style": xray_style,
            "drr_synthesis": generator.synthesize(content, drr_style), "drr_style": drr_style}


class CT2XGANLoss:
    """Eqs. 18-19 for one batch: the generator side's objective and the discriminator's, each with its terms.

    The discriminator scores the X-ray-style synthesis G(v, x, phi) as fake and the DRR at the same pose as real
    (eqs. 16-17, as the paper writes them), or the batch's real films as real when `config.real_samples` is "xray".
    """

    def __init__(self, generator: CT2XGANGenerator, discriminator: PoseDiscriminator, lpips: Perceptual,
                 config: Optional[CT2XGANLossConfig] = None) -> None:
        self.generator, self.discriminator, self.lpips = generator, discriminator, lpips
        self.config = config or CT2XGANLossConfig()

    def synthesize(self, batch: CT2XGANBatch) -> Dict[str, Tensor]:
        """`syntheses` of the batch by the generator being trained."""
        return syntheses(self.generator, batch)

    def generator_terms(self, batch: CT2XGANBatch) -> Dict[str, Tensor]:
        """Eq. 18's terms, unweighted, and "total" = lambda_adv L_adv + L_rec + L_consis + lambda_0 L0 (L_rec with
        its weights inside). Without a style encoder there are no consistency and zero terms."""
        config, films = self.config, self.synthesize(batch)
        terms = {
            "adversarial": generator_adversarial(
                self.discriminator(films["xray_synthesis"], self._discriminator_labels(batch)), config.non_saturating),
            "reconstruction": reconstruction_loss(films["drr_synthesis"], batch.drr, self.lpips, config.mae,
                                                  config.lpips),
        }
        total = config.adversarial * terms["adversarial"] + terms["reconstruction"]
        encoder = self.generator.style_encoder
        if encoder is not None:
            if config.consistency:
                terms["content_consistency"] = content_consistency(
                    encoder.content_code(films["xray_synthesis"]), encoder.content_code(films["drr_synthesis"]))
                terms["style_consistency"] = style_consistency(
                    encoder.style(films["xray_synthesis"], XRAY), films["xray_style"],
                    encoder.style(films["drr_synthesis"], DRR), films["drr_style"])
                total = total + config.content_consistency * terms["content_consistency"] \
                    + config.style_consistency * terms["style_consistency"]
            terms["zero"] = zero_loss(encoder.style(batch.drr, XRAY), encoder.style(batch.xray, DRR))
            total = total + config.zero * terms["zero"]
        terms["total"] = total
        return terms

    def discriminator_terms(self, batch: CT2XGANBatch, with_r1: bool = True) -> Dict[str, Tensor]:
        """Eq. 19's terms: "adversarial" (eq. 17 without R1), "r1" (unweighted; only `with_r1`) and "total" =
        lambda_adv (adversarial + r1_interval lambda_R1 r1). The synthesis is made without gradients."""
        config = self.config
        with torch.no_grad():
            fake = self.synthesize(batch)["xray_synthesis"]
        real = (batch.xray if config.real_samples == "xray" else batch.drr).detach().requires_grad_(with_r1)
        labels = self._discriminator_labels(batch)
        real_scores = self.discriminator(real, labels)  # (N,)
        terms = {"adversarial": discriminator_adversarial(real_scores, self.discriminator(fake, labels),
                                                          config.non_saturating)}
        total = terms["adversarial"]
        if with_r1:
            terms["r1"] = r1_penalty(real_scores, real)
            total = total + config.r1_interval * config.r1 * terms["r1"]
        terms["total"] = config.adversarial * total
        return terms

    def _discriminator_labels(self, batch: CT2XGANBatch) -> Tensor:
        """(N, 25) camera labels the discriminator is given: the batch's poses, or zeros (no pose) when its real
        samples are the real films."""
        return torch.zeros_like(batch.label) if self.config.real_samples == "xray" else batch.label
