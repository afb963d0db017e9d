"""AFD: online adversarial feature-map distillation (Chung et al., ICML 2020).

Each peer owns one discriminator per teacher on the last block's feature map: it
learns to score the teacher's map as real and the peer's own as fake, while the
peer learns to make its own map pass as real. Plus CE and the T^2-scaled KL to the
teacher's softened prediction; used with the cyclic pairing this is AFD's cyclic
scheme for more than two networks.

Only the abstract is in shared/papers, so these are our readings, stated as choices:
the least-squares GAN objective on a sigmoid score; the discriminator is the same
module as AMLN's (a 1x1 channel transfer per source width, then three convs);
Adam for the discriminator as in AMLN.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..sections import KLDirection, RampedSection
from . import functional as L
from .base import Message, Method, mean_over_teachers, teacher_key
from .extras import FeatureDiscriminator, gan_adam


class AFDConfig(RampedSection):
    """Online adversarial feature-map distillation (Chung et al., ICML 2020)."""

    name: Literal["afd"] = "afd"
    temperature: float = Field(3.0, gt=0)
    kl: bool = True
    kl_direction: KLDirection = "teacher_student"
    disc_lr: float = Field(1e-3, gt=0)


class AFD(Method):
    config_class = AFDConfig
    publishes = ("logits", "blocks")
    distillation_terms = frozenset({"kl", "adv"})
    critic_terms = frozenset({"disc"})

    def message(self, output, extras, source, step):
        """Only the last block's map travels: AFD reads nothing else."""
        return Message(source, step, logits=output.logits, blocks=(output.blocks[-1],)).detached()

    def build_extras(self, own, teachers, num_classes):
        return nn.ModuleDict(
            {
                "disc": nn.ModuleDict(
                    {
                        teacher_key(index): FeatureDiscriminator({own[-1].channels, layout[-1].channels}, outputs=1)
                        for index, layout in teachers.items()
                    }
                )
            }
        )

    def losses(self, output, targets, teachers, extras):
        cfg = self.config
        terms = {"ce": L.cross_entropy(output.logits, targets)}
        per_teacher = []
        for message in teachers:
            disc = extras["disc"][teacher_key(message.source)]
            these = {"adv": L.least_squares_generator_loss(torch.sigmoid(disc(output.blocks[-1])))}
            if cfg.kl:
                these["kl"] = L.softened_kl(output.logits, message.logits, cfg.temperature, cfg.kl_direction)
            per_teacher.append(these)
        return terms | mean_over_teachers(per_teacher)

    def critic_parameters(self, extras):
        return list(extras["disc"].parameters())

    def critic_optimizer(self, parameters):
        return gan_adam(parameters, self.config.disc_lr) if parameters else None

    def extras_step(self, output, teachers, extras):
        per_teacher = []
        for message in teachers:
            disc = extras["disc"][teacher_key(message.source)]
            own, theirs = disc.score_pair(output.blocks[-1].detach(), message.blocks[-1])
            per_teacher.append({"disc": L.least_squares_discriminator_loss(torch.sigmoid(own), torch.sigmoid(theirs))})
        return mean_over_teachers(per_teacher)
