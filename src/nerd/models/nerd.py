"""NERD: injection, one implicit layer solved to its equilibrium, decoding (paper Sec. III-V).

    s      = Conv(BN(ReLU(Conv(BN(y)))))                      injection, eq. (2)
    z*     = Trans(NL(s + z*))                                 implicit layer, eq. (11)
    NL(u)  = MSA(GN(u)) + u                                    non-local block, eq. (9)
    Trans  = GN(Conv3x3(ReLU(GN(Conv3x3(GN(.))))))             transformation block, eq. (10); last GN = post-norm
    x_hat  = y + Conv(ReLU(BN(z*)))                            decoding, eq. (4-5): the equilibrium is the noise
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from nerd.config import GradConfig, ModelConfig, SolverConfig
from nerd.deq.core import deq_solve
from nerd.deq.solvers import SolverStats
from nerd.models.attention import NeighbourhoodMSA
from nerd.models.base import Denoiser


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1)


class Injection(nn.Module):
    """s = Conv(BN(ReLU(Conv(BN(y))))): (B, C_in, H, W) -> (B, C, H, W)."""

    def __init__(self, c_in: int, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(c_in), conv3x3(c_in, c), nn.ReLU(), nn.BatchNorm2d(c), conv3x3(c, c))

    def forward(self, y: Tensor) -> Tensor:
        return self.body(y)


class Decoder(nn.Module):
    """Conv(ReLU(BN(z))): (B, C, H, W) -> (B, C_out, H, W)."""

    def __init__(self, c: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), conv3x3(c, c_out))

    def forward(self, z: Tensor) -> Tensor:
        return self.body(z)


class ImplicitLayer(nn.Module):
    """f(z; s) = Trans(NL(s + z)) (eq. 11), with the ablation switches of `ModelConfig`.

    Weight normalisation uses PyTorch's parametrizations; `DEQDenoiser` evaluates them once per forward under
    `parametrize.cached()`. Variational dropout draws one mask per forward (`new_dropout_mask`) that the caller
    passes to every evaluation, so all solver iterations and gradient steps see the same mask.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        c, e, g = cfg.channels, cfg.channels * cfg.expansion, cfg.groups
        self.cfg = cfg
        self.use_nl = cfg.blocks in ("both", "nl")
        self.use_trans = cfg.blocks in ("both", "trans")
        if self.use_nl:
            self.nl_norm = nn.GroupNorm(g, c)
            self.msa = NeighbourhoodMSA(c, cfg.heads, cfg.window, cfg.attn_block)
        if self.use_trans:
            self.norm1 = nn.GroupNorm(g, c)
            self.conv1 = conv3x3(c, e)
            self.norm2 = nn.GroupNorm(g, e)
            self.conv2 = conv3x3(e, c)
        # The post-normalisation is the layer's last operation, so the NL-only ablation keeps it too: without it
        # f(z) = z + s + MSA(GN(s + z)) has a fixed point only where the attention cancels the injection, and the
        # solver instead meets its relative tolerance by driving |z| up (measured: |z*| ~ 1e6 |s|, no denoising).
        self.post_norm = nn.GroupNorm(g, c) if cfg.post_norm else nn.Identity()
        if cfg.weight_norm:
            for module in self.weighted():
                weight_norm(module, "weight", dim=0)

    def weighted(self) -> list[nn.Module]:
        """The layers whose weights are normalised."""
        mods: list[nn.Module] = []
        if self.use_nl:
            mods += [self.msa.qkv, self.msa.proj]
        if self.use_trans:
            mods += [self.conv1, self.conv2]
        return mods

    def new_dropout_mask(self, like: Tensor) -> Tensor | None:
        """One variational-dropout mask (B, expansion*C, H, W) for a whole forward, or None (eval / rate 0)."""
        p = self.cfg.dropout
        if not self.training or p == 0 or not self.use_trans:
            return None
        b, _, h, w = like.shape
        keep = torch.empty(b, self.cfg.channels * self.cfg.expansion, h, w, device=like.device).bernoulli_(1 - p)
        return keep / (1 - p)

    def forward(self, z: Tensor, s: Tensor, mask: Tensor | None = None) -> Tensor:
        """z, s: (B, C, H, W) -> f(z; s): (B, C, H, W)."""
        u = s + z
        if self.use_nl:
            u = self.msa(self.nl_norm(u)) + u
        if self.use_trans:
            # in place: the widest tensor of the layer (expansion x C channels) is not allocated twice; GroupNorm's
            # backward needs its input, not this output (measured 3-4 % of an f-evaluation on a whole image)
            t = self.norm2(self.conv1(self.norm1(u))).relu_()
            if mask is not None:
                t = t * mask
            u = self.conv2(t)
        return self.post_norm(u)


@dataclass
class Equilibrium:
    """What one forward of NERD produced.

    Attributes:
        x_hat: (B, C, H, W) the estimate (not clipped).
        z_star: (B, C, H, W) the equilibrium found by the solver (detached).
        s: (B, C, H, W) the injection.
        stats: per-sample solver statistics.
        backward_stats: with the implicit gradient, the statistics of the backward linear solve, appended once
            `backward()` has run through x_hat (empty otherwise).
    """

    x_hat: Tensor
    z_star: Tensor
    s: Tensor
    stats: SolverStats
    backward_stats: list[SolverStats] = field(default_factory=list)


class DEQDenoiser(Denoiser):
    """NERD. `forward(y, sigma)` returns x_hat; `equilibrium(y, sigma)` also returns the solver's statistics.

    NERD is trained per noise level, so `sigma` is accepted for the common contract and not used by the network.
    Gradients follow `grad` whenever autograd is on (training); under `torch.no_grad()` the output is decoded
    straight from z*.
    """

    def __init__(
        self, cfg: ModelConfig, solver: SolverConfig | None = None, grad: GradConfig | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.solver = solver or SolverConfig()
        self.grad = grad or GradConfig()
        self.inject = Injection(cfg.in_channels, cfg.channels)
        self.layer = ImplicitLayer(cfg)
        self.decode = Decoder(cfg.channels, cfg.in_channels)

    @contextlib.contextmanager
    def _normalised_weights(self) -> Iterator[None]:
        """Compute the weight-normalised weights once for this forward (with grad, so g and v get gradients)."""
        if not self.cfg.weight_norm:
            yield
            return
        with parametrize.cached():
            for module in self.layer.weighted():
                module.weight  # noqa: B018 -- fills the cache in the current grad mode
            yield

    def equilibrium(
        self, y: Tensor, sigma: float | Tensor | None = None, *, solver: SolverConfig | None = None
    ) -> Equilibrium:
        """Denoise y: (B, C, H, W) in ~[0, 1] (unclipped noisy input). `solver` overrides the model's solver."""
        solver = solver or self.solver
        with self._normalised_weights():
            s = self.inject(y)
            mask = self.layer.new_dropout_mask(s)

            def f(z: Tensor) -> Tensor:
                return self.layer(z, s, mask)

            sol = deq_solve(f, torch.zeros_like(s), solver, self.grad)  # from z = 0, as the paper does
            out = self.decode(sol.z.to(s.dtype))
        x_hat = y + out if self.cfg.equilibrium == "noise" else out
        return Equilibrium(x_hat=x_hat, z_star=sol.z_star, s=s.detach(), stats=sol.stats,
                           backward_stats=sol.backward_stats)

    def forward(
        self, y: Tensor, sigma: float | Tensor | None = None, *, solver: SolverConfig | None = None
    ) -> Tensor:
        return self.equilibrium(y, sigma, solver=solver).x_hat
