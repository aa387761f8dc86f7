"""Conditioner networks of coupling layers. Their last layer is zero-initialised, so every coupling
starts as a fixed map (the identity for additive coupling and for scales with ``scale(0) = 1``).

* :class:`MLP` for vectors ``(B, D)``: Linear -> ReLU -> ... -> Linear.
* :class:`GlowCNN` for images ``(B, C, H, W)``: conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3
  (Kingma & Dhariwal 2018, sec. 3.3 / Table 1, without the ActNorm inside the network).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MLP", "GlowCNN", "ZERO_CONV_LOGSCALE_FACTOR", "CHANNELS_LAST_ON_CPU"]

ZERO_CONV_LOGSCALE_FACTOR = 3.0
"""Glow's zero conv multiplies its output by ``exp(3 * logs)`` per channel (openai/glow ``conv2d_zeros``)."""
CHANNELS_LAST_ON_CPU = True
"""Run GlowCNN's convolutions on channels-last (NHWC) inputs on a CPU (not in float64): oneDNN's
convolutions are faster on that layout, most of all at the small spatial sizes of multi-scale flows
(one training step of the conditioner alone, batch 64, 1 thread, interleaved medians: 2x2 images
3.3x, 4x4 1.09x, 7x7 1.12x, 14x14 1.31x). The weights keep their layout (and checkpoints theirs)."""


class MLP(nn.Sequential):
    """``in_features -> hidden (x n_hidden, ReLU) -> out_features``; the last Linear is all zeros."""

    def __init__(self, in_features: int, out_features: int, *, hidden: int = 64, n_hidden: int = 2):
        if min(in_features, out_features, hidden) < 1 or n_hidden < 0:
            raise ValueError(
                f"MLP needs positive sizes and n_hidden >= 0, got in={in_features}, out={out_features}, "
                f"hidden={hidden}, n_hidden={n_hidden}"
            )
        sizes = [in_features] + [hidden] * n_hidden
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        last = nn.Linear(sizes[-1], out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        super().__init__(*layers, last)


class GlowCNN(nn.Module):
    """Glow's coupling network ``conv3x3 -> ReLU -> conv1x1 -> ReLU -> conv3x3``, ``(B, C_in, H, W) ->
    (B, C_out, H, W)``, zero padding.

    The last convolution is zero-initialised. With ``learn_output_scale`` (default, as Glow's
    ``conv2d_zeros``) its output is multiplied per channel by ``exp(3 * logs)``, ``logs`` a learnable
    vector initialised to 0: the output scale can then grow quickly without large weights.
    """

    def __init__(self, in_channels: int, out_channels: int, *, hidden: int = 64, learn_output_scale: bool = True):
        super().__init__()
        if min(in_channels, out_channels, hidden) < 1:
            raise ValueError(f"GlowCNN needs positive sizes, got in={in_channels}, out={out_channels}, hidden={hidden}")
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, out_channels, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.logs = nn.Parameter(torch.zeros(out_channels)) if learn_output_scale else None

    def forward(self, x: Tensor) -> Tensor:
        if CHANNELS_LAST_ON_CPU and x.device.type == "cpu" and x.dtype != torch.float64:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.net(x)  # (B, C_out, H, W)
        if self.logs is not None:
            h = h * torch.exp(ZERO_CONV_LOGSCALE_FACTOR * self.logs).view(1, -1, 1, 1)
        return h
