"""The paper's pixel classifiers, M at once: one module with stacked weights ``[M, in, out]``, so one pass over
the data feeds every member. Adam and BatchNorm are per element / per channel, so this trains exactly M
independent MLPs of the paper's shape (D->128->ReLU->BN->32->ReLU->BN->C, or 256/128 for C >= 30), each
initialised from its own seed (``seed + i``) with the paper's N(0, 0.02) weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def hidden_widths(num_classes: int) -> tuple[int, int]:
    """The paper's pixel_classifier widths: (128, 32) for fewer than 30 classes, else (256, 128)."""
    return (128, 32) if num_classes < 30 else (256, 128)


class EnsembleMLP(nn.Module):
    """M pixel classifiers. ``forward``: ``[B, D]`` (shared) or ``[M, B, D]`` -> logits ``[M, B, C]``."""

    def __init__(self, members: int, dim: int, num_classes: int, seed: int):
        super().__init__()
        self.members, self.dim, self.num_classes, self.seed = members, dim, num_classes, seed
        widths = (dim, *hidden_widths(num_classes), num_classes)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        # One generator per member, drawing its layers one after another: every layer of every member is an
        # independent draw, as the paper's members initialise each nn.Linear on its own.
        generators = [torch.Generator().manual_seed(seed + member) for member in range(members)]
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            stacked = torch.empty(members, fan_in, fan_out)
            for member, generator in enumerate(generators):
                stacked[member] = torch.randn(fan_out, fan_in, generator=generator).T * 0.02
            self.weights.append(nn.Parameter(stacked))
            self.biases.append(nn.Parameter(torch.zeros(members, 1, fan_out)))
        # One BatchNorm over M*width channels is M independent BatchNorms of `width` channels.
        self.norms = nn.ModuleList([nn.BatchNorm1d(members * width) for width in widths[1:-1]])

    @classmethod
    def stack(cls, parts: list["EnsembleMLP"]) -> "EnsembleMLP":
        """Join ensembles trained in separate passes into one, members in order."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        joined = cls(0, first.dim, first.num_classes, seed=first.seed)  # members are seed + i in order
        joined.members = sum(part.members for part in parts)
        with torch.no_grad():
            for layer in range(len(first.weights)):
                joined.weights[layer] = nn.Parameter(torch.cat([p.weights[layer].detach().cpu() for p in parts]))
                joined.biases[layer] = nn.Parameter(torch.cat([p.biases[layer].detach().cpu() for p in parts]))
            norms = []
            for layer, norm in enumerate(first.norms):
                merged = nn.BatchNorm1d(norm.num_features // first.members * joined.members)
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(merged, name).copy_(torch.cat([getattr(p.norms[layer], name).detach().cpu() for p in parts]))
                norms.append(merged)
            joined.norms = nn.ModuleList(norms)
        return joined

    def _member_views(self, member: int) -> list[torch.Tensor]:
        views = [w[member] for w in self.weights] + [b[member] for b in self.biases]
        for norm in self.norms:
            width = norm.num_features // self.members
            part = slice(member * width, (member + 1) * width)
            views += [norm.weight[part], norm.bias[part], norm.running_mean[part], norm.running_var[part]]
        return views

    def member_state(self, member: int) -> list[torch.Tensor]:
        """Copies of one member's weights, biases and BatchNorm affine parameters and running statistics."""
        return [view.detach().clone() for view in self._member_views(member)]

    @torch.no_grad()
    def load_member_state(self, member: int, state: list[torch.Tensor]) -> None:
        for view, saved in zip(self._member_views(member), state, strict=True):
            view.copy_(saved)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            h = torch.einsum("bd,mdh->mbh", x, self.weights[0]) + self.biases[0]
        else:
            h = torch.baddbmm(self.biases[0], x, self.weights[0])
        for layer in range(1, len(self.weights)):
            h = F.relu(h)
            members, batch, width = h.shape
            h = self.norms[layer - 1](h.permute(1, 0, 2).reshape(batch, members * width))
            h = h.reshape(batch, members, width).permute(1, 0, 2)
            h = torch.baddbmm(self.biases[layer], h, self.weights[layer])
        return h
