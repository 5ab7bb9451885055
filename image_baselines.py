"""
The DiT and the one-pass regressor the image EBT is compared with, on its transformer
(image_models.PatchTransformer) and at its size. Importing this module registers them in ebt.MODELS.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import ebt
import image_models


def timestep_embedding(t, dim):
    """Sinusoidal embedding (B, dim) of DDPM steps t (B,)."""
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def unpatchify(x, p, C):
    """(B, N, C*p*p) -> (B, C, H, W) for a square grid of N patches."""
    B, N, _ = x.shape
    n = math.isqrt(N)
    return x.reshape(B, n, n, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, n * p, n * p)


class ImageDiT(nn.Module):
    """The paper's image baseline, a Diffusion Transformer: conditioned on the DDPM step t through
    adaLN-Zero, it predicts the noise; trained on t in 1..noise_t; denoises with DDIM."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.body = image_models.PatchTransformer(cfg)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.n_embd, cfg.n_embd), nn.SiLU(), nn.Linear(cfg.n_embd, cfg.n_embd))
        self.out = nn.Linear(cfg.n_embd, cfg.channels * cfg.patch_size ** 2, bias=False)
        self.out.zero_init = True
        self.apply(ebt.init_weights)

    def predicted_noise(self, x, t):
        """x: (B, C, S, S) at DDPM steps t (B,). Returns the noise in x, (B, C, S, S)."""
        cond = self.time_mlp(timestep_embedding(t, self.config.n_embd))
        return unpatchify(self.out(self.body(x, cond)), self.config.patch_size, self.config.channels)

    def forward(self, clean, noise):
        t = torch.randint(1, self.config.noise_t + 1, (len(clean),), device=clean.device)
        loss = F.mse_loss(self.predicted_noise(image_models.ddpm_noise(clean, t, noise), t), noise)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def denoise(self, noisy, t, passes):
        """Deterministic DDIM from step t down to 0 in `passes` evaluations of the model."""
        times = torch.linspace(t, 0, passes + 1).round().long().tolist()
        x = noisy
        for now, later in zip(times, times[1:]):
            a_now, a_later = image_models.signal_variance(now).item(), image_models.signal_variance(later).item()
            noise = self.predicted_noise(x, torch.full((len(x),), now, device=x.device))
            clean = (x - (1 - a_now) ** 0.5 * noise) / a_now ** 0.5
            x = a_later ** 0.5 * clean + (1 - a_later) ** 0.5 * noise
        return x


class ImageRegressor(nn.Module):
    """The same transformer trained to output the clean image in one forward pass. With nothing to
    condition on, its conditioning vector is a zero buffer, so the blocks' shift, scale and gate are
    learned constants (the adaLN biases). The simplest, and at this size strong, baseline."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.body = image_models.PatchTransformer(cfg)
        self.register_buffer("cond", torch.zeros(cfg.n_embd))
        self.out = nn.Linear(cfg.n_embd, cfg.channels * cfg.patch_size ** 2, bias=False)
        self.out.zero_init = True  # predicts a correction to its input: it starts as the identity
        self.apply(ebt.init_weights)

    def denoise(self, noisy):
        patches = self.out(self.body(noisy, self.cond.expand(len(noisy), -1)))  # (B, N, C*p*p)
        return noisy + unpatchify(patches, self.config.patch_size, self.config.channels)

    def forward(self, clean, noise):
        pred = self.denoise(image_models.ddpm_noise(clean, self.config.noise_t, noise))
        loss = F.smooth_l1_loss(pred, clean)
        return loss, {"loss": loss.detach(), "psnr": image_models.psnr(pred.detach(), clean).mean()}


ebt.MODELS.update(image_dit=ImageDiT, image_regressor=ImageRegressor)
