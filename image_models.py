"""
The image models: the denoising EBT, which thinks with ebt.py's think() as the text EBT does, and the baselines
it is compared with (train_image.py), all on one patch transformer of ebt.py's blocks, adaLN-Zero conditioned.
The noise is the DDPM forward process of the paper's image runs.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import ebt
from ebt import DDPM_STEPS, RMSNorm, Thinker, init_weights


def attend_all(attn, x, double_backward):
    """attn (an ebt.Attention) over image patches x (B, T, D), every patch seeing every patch."""
    q, k, v = attn.heads(x)
    if double_backward:  # explicit softmax: the fused kernels have no second derivative
        att = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, H, T, T)
        return attn.merge(att @ v)
    return attn.merge(F.scaled_dot_product_attention(q, k, v))


class AdaLNBlock(ebt.Block):
    """A block over image patches: every patch sees every patch, and a conditioning vector sets each half's
    shift, scale and gate (adaLN-Zero, as DiT): the gates start at zero, so every block starts as the identity."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.ada = nn.Linear(cfg.n_embd, 6 * cfg.n_embd)
        self.ada.zero_init = True

    def forward(self, x, cond, double_backward):
        """x: (B, T, D) patches, positions added; cond: (B, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(cond))[:, None].chunk(6, dim=-1)
        x = x + gate1 * attend_all(self.attn, self.attn_norm(x) * (1 + scale1) + shift1, double_backward)
        return x + gate2 * self.mlp(self.mlp_norm(x) * (1 + scale2) + shift2)

def signal_variance(t):
    """The share of the signal's variance left after t steps of the DDPM forward process of the paper's image
    runs (0 = clean; DDPM's alpha-bar): the product over s = 1..t of (1 - beta_s), betas linear from 1e-4 to 0.02."""
    betas = torch.linspace(1e-4, 0.02, DDPM_STEPS, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), (1 - betas).cumprod(0)])[t]


def ddpm_noise(clean, t, noise):
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise, a_t = signal_variance(t) (DDPM's alpha-bar); t an int or (B,).
    At t = 99 (the paper's training level) the signal is scaled by 0.95 and the noise std is 0.32."""
    a = signal_variance(torch.as_tensor(t)).to(clean.device, clean.dtype).reshape(-1, 1, 1, 1)
    return a.sqrt() * clean + (1 - a).sqrt() * noise


def patchify(img, p):
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), patches in row-major order."""
    B, C, H, W = img.shape
    x = img.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def psnr(pred, clean):
    """Peak signal-to-noise ratio in dB of each image in [-1, 1] (pred is clipped first): (B,)."""
    mse = (pred.clamp(-1, 1) - clean).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp(min=1e-10))


class PatchTransformer(nn.Module):
    """The image models' body: patches and learned positions, the shared blocks unmasked, adaLN-Zero conditioned."""

    def __init__(self, cfg):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patch_emb = nn.Linear(cfg.channels * cfg.patch_size ** 2, cfg.n_embd, bias=False)
        self.pos_emb = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2, cfg.n_embd)  # one per (row, col)
        self.blocks = nn.ModuleList([AdaLNBlock(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.n_embd)

    def forward(self, img, cond, double_backward=False):
        """img: (B, C, S, S); cond: (B, D). Returns (B, N, D)."""
        x = self.patch_emb(patchify(img, self.patch_size)) + self.pos_emb.weight
        for block in self.blocks:
            x = block(x, cond, double_backward)
        return self.norm(x)


class ImageEBT(Thinker, nn.Module):
    """The energy of a candidate clean image in [-1, 1], a head's mean over patches, the blocks conditioned on the
    step; denoising is thinking from the noisy image, y <- y - alpha dE/dy. Untrained, it returns its input."""
    energy_ndim = 1  # energies (B,), one per image

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.body = PatchTransformer(cfg)
        self.step_emb = nn.Embedding(cfg.landscapes, cfg.n_embd)
        self.energy_head = nn.Linear(cfg.n_embd, 1, bias=False)
        self.energy_head.zero_init = True
        self.apply(init_weights)
        self.raw_step_size = nn.Parameter(torch.tensor(float(cfg.step_size)), requires_grad=cfg.learn_step_size)

    def energy(self, img, landscape):
        """img: (B, C, S, S) candidates. Returns energies (B,)."""
        cond = self.step_emb.weight[landscape].expand(len(img), -1)
        return self.energy_head(self.body(img, cond, self.differentiates_twice())).squeeze(-1).mean(1)

    def forward(self, clean, noise, steps=None, generator=None):
        """Think from the clean images noised to step noise_t; each step's loss is its smooth-L1 distance
        to the clean image. generator: unused (the start is the noisy image)."""
        traj = self.think(self.energy, ddpm_noise(clean, self.config.noise_t, noise), steps)
        losses = [F.smooth_l1_loss(y, clean) for y in traj.ys[1:]]
        metrics = {**self.metrics(traj, losses), "psnr": psnr(traj.ys[-1].detach(), clean).mean()}
        if not self.training:
            metrics["psnr_per_step"] = torch.stack([psnr(y, clean).mean() for y in traj.ys[1:]])
        return self.loss(losses), metrics

    def learn(self, clean, noise, weight, steps=None):
        """One training batch, backpropagated one thinking step at a time (Thinker.think_and_backward)."""
        noisy = ddpm_noise(clean, self.config.noise_t, noise)
        traj, losses = self.think_and_backward(self.energy, noisy, clean, F.smooth_l1_loss, weight, steps)
        return {**self.metrics(traj, losses), "psnr": psnr(traj.ys[-1].detach(), clean).mean()}


# -----------------------------------------------------------------------------
# The baselines, on the same patch transformer and at the same size

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
        self.body = PatchTransformer(cfg)
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
        loss = F.mse_loss(self.predicted_noise(ddpm_noise(clean, t, noise), t), noise)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def denoise(self, x, t, passes):
        """Deterministic DDIM from the noisy x at step t down to 0 in `passes` evaluations of the model."""
        times = torch.linspace(t, 0, passes + 1).round().long().tolist()
        for now, later in zip(times, times[1:]):
            a_now, a_later = signal_variance(now).item(), signal_variance(later).item()
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
        self.body = PatchTransformer(cfg)
        self.register_buffer("cond", torch.zeros(cfg.n_embd))
        self.out = nn.Linear(cfg.n_embd, cfg.channels * cfg.patch_size ** 2, bias=False)
        self.out.zero_init = True  # predicts a correction to its input: it starts as the identity
        self.apply(ebt.init_weights)

    def denoise(self, noisy):
        patches = self.out(self.body(noisy, self.cond.expand(len(noisy), -1)))  # (B, N, C*p*p)
        return noisy + unpatchify(patches, self.config.patch_size, self.config.channels)

    def forward(self, clean, noise):
        pred = self.denoise(ddpm_noise(clean, self.config.noise_t, noise))
        loss = F.smooth_l1_loss(pred, clean)
        return loss, {"loss": loss.detach(), "psnr": psnr(pred.detach(), clean).mean()}


ebt.MODELS.update(image_ebt=ImageEBT, image_dit=ImageDiT, image_regressor=ImageRegressor)
