"""DINO's projection head (facebookresearch/dino DINOHead): MLP -> bottleneck -> L2-normalize -> prototypes.

Shapes: N rows (crops x batch), D encoder width, H hidden_dim, Z bottleneck_dim, K out_dim (prototypes).
The prototype layer is a weight-normalized linear without bias, W = g * V / ||V|| row-wise; with norm_last_layer
the gain g is fixed to 1 (not trained), so only the direction V is learned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead: nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        # Weight norm written out (not torch.nn.utils.parametrizations.weight_norm) so that the parameters are two
        # plain tensors that DeepSpeed can partition and the state dict stays simple: last_layer_v [K, Z], gain [K, 1].
        self.last_layer_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        self.last_layer_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)
        self.norm_last_layer = norm_last_layer
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # The reference initializes the prototype layer like nn.Linear and its gain to 1.
        nn.init.kaiming_uniform_(self.last_layer_v, a=5**0.5)
        self.last_layer_g.fill_(1.0)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """The prototype layer's trainable parameters (frozen for the first steps by the DINO objective)."""
        return [p for p in (self.last_layer_v, self.last_layer_g) if p.requires_grad]

    def forward(self, x_ND: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        """freeze_last_layer: no gradient reaches the prototype layer (the MLP still trains)."""
        z_NZ = F.normalize(self.mlp(x_ND), dim=-1, p=2)
        v, g = self.last_layer_v, self.last_layer_g
        if freeze_last_layer:
            v, g = v.detach(), g.detach()
        w_KZ = g * v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return z_NZ @ w_KZ.to(z_NZ.dtype).T
