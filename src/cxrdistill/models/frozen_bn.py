"""Frozen BatchNorm for backbones: with ``freeze_bn`` their BatchNorm layers keep their (ImageNet or
initial) statistics and affine weights, and stay in eval mode whatever ``train()`` is called with —
the usual choice for detectors trained on small batches."""

from __future__ import annotations

from torch import nn


class FrozenBatchNormMixin(nn.Module):
    """A backbone that calls :meth:`freeze_batchnorm` at the end of its ``__init__``."""

    freeze_bn: bool = False

    def freeze_batchnorm(self, freeze: bool) -> None:
        """With ``freeze``: no gradient to any BatchNorm parameter, and BatchNorm kept in eval mode."""
        self.freeze_bn = freeze
        if freeze:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> FrozenBatchNormMixin:
        """Usual ``train``, except that frozen BatchNorm layers stay in eval mode."""
        super().train(mode)
        if self.freeze_bn:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self
