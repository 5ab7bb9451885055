"""
The image models: the denoising EBT, which thinks with ebt.py's think() as the text EBT does, and the baselines
it is compared with (train_image.py), all on one patch transformer of ebt.py's blocks, adaLN-Zero conditioned.
The noise is the DDPM forward process of the paper's image runs.
"""
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
    energy_dims = 1  # energies (B,), one per image

    def __init__(self, cfg):
        super().__init__()
        assert cfg.model == "image_ebt"
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
        traj = self.descend(self.energy, ddpm_noise(clean, self.config.noise_t, noise), steps)
        losses = [F.smooth_l1_loss(y, clean) for y in traj.ys[1:]]
        metrics = {**self.metrics(traj, losses), "psnr": psnr(traj.ys[-1].detach(), clean).mean()}
        if not self.training:
            metrics["psnr_per_step"] = torch.stack([psnr(y, clean).mean() for y in traj.ys[1:]])
        return self.loss(losses), metrics

    def learn(self, clean, noise, weight, steps=None):
        """One training batch, backpropagated one thinking step at a time (Thinker.descend_and_backward)."""
        noisy = ddpm_noise(clean, self.config.noise_t, noise)
        traj, losses = self.descend_and_backward(self.energy, noisy, clean, F.smooth_l1_loss, weight, steps)
        return {**self.metrics(traj, losses), "psnr": psnr(traj.ys[-1].detach(), clean).mean()}


ebt.MODELS.update(image_ebt=ImageEBT)
