"""
nanoEBT: Energy-Based Transformers in one file.

An EBT is a transformer that scores a (context, candidate prediction) pair with
one scalar energy E(x, y), low when y fits x. It predicts by *thinking*: start
from random logits y and descend the energy of the candidate distribution p,

    p = softmax(y);   y <- p - step_size * dE(x, p)/dp,

and it is trained end to end through those steps (second-order gradients), so
it learns a landscape whose descent lands on the right answer.

Reading order:
  1. configuration
  2. transformer blocks shared by every model (RMSNorm, rotary, SwiGLU, adaLN-Zero)
  3. think(): the descent loop, one implementation for text and images
  4. the autoregressive text EBT (with its per-token thinking: candidates, next_token), and the
     Transformer++ baseline
  5. text data and tokenizers
  6. the training loop, checkpoints and command-line helpers
  7. thinking at inference: KV-cached generation, self-verification, evaluation (built on 4)
  8. images: DDPM noise, the denoising EBT, a diffusion transformer, a one-pass regressor

Paper: "Energy-Based Transformers are Scalable Learners and Thinkers",
Gladstone et al., 2025 (arXiv 2507.02092).
"""

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Thinking sharpens candidates until some probabilities fall below float32's normal range
# (1e-38); CPUs compute with such denormal numbers many times slower, and they mean nothing
# here, so the CPU flushes them to zero.
torch.set_flush_denormal(True)


class UsageError(Exception):
    """A problem with the user's input: reported as one line, exit code 2."""


class ConfigError(UsageError, ValueError):
    """An impossible configuration value; the message names the field."""


# -----------------------------------------------------------------------------
# 1. Configuration

TEXT_KINDS = ("ebt", "transformer")
IMAGE_KINDS = ("image_ebt", "image_dit", "image_regressor")
MODEL_KINDS = TEXT_KINDS + IMAGE_KINDS
VERIFY_LANGEVIN_STD = 1.0  # inference noise for self-verification candidates (the paper's)
MAX_THINK_STEPS = 64  # training: each step is a second-order forward and backward
DDPM_STEPS = 1000  # the image noise: a DDPM forward process over this many steps


@dataclass
class ModelConfig:
    model: str = "ebt"            # one of MODEL_KINDS ("transformer" is the Transformer++ baseline)
    vocab_size: int = 65
    block_size: int = 256         # context length
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    mlp_hidden: int = 0           # SwiGLU hidden width; 0 = n_embd, the paper's sizes (xxs: 6 x 384, 6.18M)
    # thinking (EBT only); the defaults are the paper's S1 values (train_text.py's s1 rescales alpha to the vocabulary)
    think_steps: int = 2          # descent steps during training
    landscapes: int = 2           # step embeddings; step k uses min(k, landscapes - 1). S2: 1, one landscape
    step_size: float = 500.0      # alpha (initial value when learned)
    learn_step_size: bool = True
    step_size_lr_mult: float = 1500.0  # alpha's lr = base lr x this
    init_std: float = 1.0         # thinking starts from logits drawn from N(0, init_std^2)
    # "System 2" training options from the paper (its S2 recipe), all off by default
    langevin_std: float = 0.0     # std of Gaussian noise added to the logits before each step
    random_step_size: float = 1.0  # s > 1: each token's alpha drawn from U[alpha/s, alpha*s]
    random_steps: int = 0         # train with think_steps + U{0..random_steps} steps (one count per batch)
    truncate: bool = False        # train the last step only: its gradient keeps the graph, the loss is that step's
    detach: bool = True           # cut the graph between steps (False: backprop the whole path)
    replay_size: int = 0          # replay buffer: keep the final logits of the last N training sequences
    replay_batch: float = 0.5     # ... and add this fraction of a batch of them, started where they ended
    # images (IMAGE_KINDS): square crops in [-1, 1] cut into square patches
    channels: int = 3
    image_size: int = 32
    patch_size: int = 4
    noise_t: int = 99             # training noise: DDPM step t (the DiT trains on 1..t); the paper's 99

    def __post_init__(self):
        def check(ok, name, why):
            if not ok:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r}: {why}")
        check(self.model in MODEL_KINDS, "model", f"must be one of {MODEL_KINDS}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "channels", "image_size", "patch_size",
                     "think_steps", "landscapes"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(self.n_embd % self.n_head == 0, "n_embd", f"must be divisible by n_head={self.n_head}")
        if self.model in TEXT_KINDS:
            check((self.n_embd // self.n_head) % 2 == 0, "n_embd", "head size n_embd/n_head must be even for rotary")
        check(self.image_size % self.patch_size == 0, "image_size", f"must be a multiple of patch_size={self.patch_size}")
        for name in ("mlp_hidden", "random_steps", "replay_size"):
            check(getattr(self, name) >= 0, name, "must be >= 0")
        self.mlp_hidden = self.mlp_hidden or self.n_embd
        check(self.think_steps + self.random_steps <= MAX_THINK_STEPS, "think_steps",
              f"think_steps + random_steps must be <= {MAX_THINK_STEPS} in training (inference may think longer)")
        check(self.landscapes <= self.think_steps + self.random_steps, "landscapes",
              "must be <= think_steps + random_steps (more would never be used)")
        for name in ("step_size", "step_size_lr_mult", "init_std", "langevin_std", "replay_batch"):
            check(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, "must be finite and >= 0")
        check(self.step_size > 0, "step_size", "must be > 0")
        check(math.isfinite(self.random_step_size) and self.random_step_size >= 1, "random_step_size", "must be >= 1")
        check(1 <= self.noise_t <= DDPM_STEPS, "noise_t", f"must be a DDPM step in 1..{DDPM_STEPS}")

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"ModelConfig: unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


# -----------------------------------------------------------------------------
# 2. Transformer blocks (Llama style: RMSNorm, rotary positions, SwiGLU, no biases but adaLN's)

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # the fused op has a double backward too
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Rotary(nn.Module):
    """Rotary position embedding: rotates channel pairs (i, i + Dh/2) by position-dependent
    angles. Written as x * cos + swap_halves(x) * sin with the tables widened to Dh: four
    ops, which matters because the prediction stream differentiates through it twice."""

    def __init__(self, head_dim, max_positions, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(max_positions).float(), inv_freq)  # (P, Dh/2)
        self.register_buffer("cos", torch.cat([angles.cos(), angles.cos()], -1), persistent=False)  # (P, Dh)
        self.register_buffer("sin", torch.cat([-angles.sin(), angles.sin()], -1), persistent=False)

    def forward(self, x, start, scale=1.0):
        """x: (B, H, T, Dh), token t sits at position start + t; scale multiplies the result."""
        T = x.shape[-2]
        if start + T > self.cos.shape[0]:
            raise ValueError(f"position {start + T} exceeds the rotary table ({self.cos.shape[0]})")
        cos, sin = self.cos[start:start + T].to(x.dtype), self.sin[start:start + T].to(x.dtype)  # (T, Dh)
        if scale != 1.0:  # on the tables: far smaller than x
            cos, sin = cos * scale, sin * scale
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def causal_mask(q_len, k_len, device):
    """(q_len, k_len) boolean mask, bottom-right aligned: query i sees keys 0..k_len-q_len+i."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def heads(self, x, rotary=None, start=0):
        """Queries, keys, values, each (B, H, T, Dh); rotary=None: q and k come back unrotated."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        if rotary is None:
            return q, k, v
        return rotary(q, start), rotary(k, start), v

    def merge(self, y):
        B, H, T, Dh = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, H * Dh))

    def forward(self, x, rotary, past=None):
        """Causal self-attention over ordinary tokens (the context stream).
        past: cached (k, v) of earlier tokens. Returns the output and this layer's (k, v)."""
        start = 0 if past is None else past[0].shape[-2]
        q, k, v = self.heads(x, rotary, start)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        T, L = q.shape[-2], k.shape[-2]
        if T == L:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:  # one new token sees everything before it
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(T, L, q.device))
        return self.merge(y), (k, v)

    def attend_predictions(self, x, rotary, context, double_backward):
        """Attention for the prediction stream. x: (B, P, D) prediction tokens that stand
        for the next token after each of the last P context tokens. Prediction p sees the
        context up to its own position and itself, never another prediction.
        context: this layer's cached context (k, v), each (B, H, T, Dh)."""
        k_ctx, v_ctx = context
        T, P = k_ctx.shape[-2], x.shape[1]
        start = T - P + 1  # prediction p sits one past its context token
        visible = causal_mask(P, T, x.device)  # (P, T)
        if double_backward:
            # Explicit softmax attention: the fused kernels have no second derivative. Training
            # differentiates this twice, so every op saved counts three times: a rotation keeps the
            # dot product of two vectors at one position, so a prediction scores its own key
            # unrotated and only the query is rotated; the scale rides on the rotary tables; the
            # mask is added (its backward is free), not filled.
            q, k, v = self.heads(x)
            scale = q.shape[-1] ** -0.5
            to_self = (q * k).sum(-1, keepdim=True) * scale  # (B, H, P, 1)
            mask_bias = torch.zeros(P, T, dtype=q.dtype, device=x.device).masked_fill_(~visible, float("-inf"))  # (P, T)
            to_context = rotary(q, start, scale) @ k_ctx.transpose(-2, -1) + mask_bias  # (B, H, P, T)
            att_context, att_self = torch.cat([to_context, to_self], dim=-1).softmax(dim=-1).split([T, 1], dim=-1)
            y = att_context @ v_ctx + att_self * v
        else:
            q, k, v = self.heads(x, rotary, start)
            keys, values = torch.cat([k_ctx, k], dim=2), torch.cat([v_ctx, v], dim=2)
            only_self = torch.eye(P, dtype=torch.bool, device=x.device)
            # compiled (generation): the math backend, whose plain ops the compiler fuses; the fused
            # kernel's backward is slow for a single query
            with sdpa_kernel(SDPBackend.MATH) if torch.compiler.is_compiling() else contextlib.nullcontext():
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=torch.cat([visible, only_self], dim=1))
        return self.merge(y)

    def attend_all(self, x, double_backward):
        """Bidirectional attention: every token sees every token (image patches).
        x: (B, T, D) with positions already added."""
        q, k, v = self.heads(x)
        if double_backward:  # explicit softmax: the fused kernels have no second derivative
            att = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, H, T, T)
            y = att @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.merge(y)


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, cfg):
        super().__init__()
        self.gate_up = nn.Linear(cfg.n_embd, 2 * cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd)
        self.mlp = MLP(cfg)
        if cfg.model in IMAGE_KINDS:  # adaLN-Zero (DiT): a conditioning vector sets shift, scale and gate
            self.ada = nn.Linear(cfg.n_embd, 6 * cfg.n_embd)
            self.ada.zero_init = True  # gates start at zero: every block starts as the identity

    def forward(self, x, rotary, past=None):
        a, kv = self.attn(self.attn_norm(x), rotary, past)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), kv

    def forward_predictions(self, x, rotary, context, double_backward):
        x = x + self.attn.attend_predictions(self.attn_norm(x), rotary, context, double_backward)
        return x + self.mlp(self.mlp_norm(x))

    def forward_bidirectional(self, x, cond, double_backward):
        """Image patches: every patch sees every patch; cond (B, D) modulates the block."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(cond))[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn.attend_all(self.attn_norm(x) * (1 + scale1) + shift1, double_backward)
        return x + gate2 * self.mlp(self.mlp_norm(x) * (1 + scale2) + shift2)


class Trunk(nn.Module):
    """Token embedding plus a stack of causal blocks: the Transformer++ body, and the
    context stream of the text EBT."""

    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        # +1: a prediction sits one position past its context token
        self.rotary = Rotary(cfg.n_embd // cfg.n_head, cfg.block_size + 1)

    def forward(self, idx, cache=None):
        """idx: (B, T) tokens. cache: per-layer (k, v) of earlier tokens, or None.
        Returns hidden states (B, T, D) and the per-layer (k, v) of all tokens so far."""
        x = self.tok_emb(idx)
        kvs = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, self.rotary, None if cache is None else cache[i])
            kvs.append(kv)
        return x, kvs


def init_weights(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        if getattr(module, "zero_init", False):
            nn.init.zeros_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        else:
            nn.init.normal_(module.weight, mean=0.0, std=0.02)


# -----------------------------------------------------------------------------
# 3. Thinking: gradient descent on the energy

@dataclass
class Trajectory:
    """What one round of thinking went through. ys[k]: the state after k steps (ys[0] the start);
    energies[k]: the energy of ys[k] on step k's landscape; the last entry (final_energy) scores
    the final state on the last step's landscape, so it compares like with like."""
    ys: list
    energies: list
    steps_used: torch.Tensor = None  # per position, when stopping adaptively


def energy_and_gradient(energy_fn, x, landscape, create_graph):
    """energy_fn(x, landscape) (B, ...) and the gradient of its sum with respect to x."""
    energy = energy_fn(x, landscape)
    (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=create_graph)
    return energy, grad


def traced_energy_and_gradient(energy_fn, x, landscape, create_graph):
    """The same by torch.func, which torch.compile traces whole (torch.autograd.grad would break
    the graph): the compiled inference step (see compile_model)."""
    def total(x):
        energy = energy_fn(x, landscape)
        return energy.sum(), energy
    with torch.set_grad_enabled(create_graph):  # without it, no graph to the parameters
        grad, (_, energy) = torch.func.grad_and_value(total, has_aux=True)(x)
    return energy, grad


def think(energy_fn, y, steps, step_size, *, normalize=None, landscapes=None, create_graph=False, detach=True,
          truncate=False, langevin_std=0.0, random_step_size=1.0, tolerance=None, final_energy=True, on_step=None,
          gradient=energy_and_gradient):
    """Minimise energy_fn(x, landscape) -> (B, ...) energies by gradient descent.

    Each step scores the candidate x = normalize(y) (text: the distribution softmax(y);
    images: y itself) and moves to y <- x - step_size * dE/dx. For text the gradient is with
    respect to the probabilities and the new logits replace the old ones, as in the paper's
    code (model/nlp/ebt.py, EBT_NLP.forward with normalize_initial_condition).

    landscapes: step k descends landscape min(k, landscapes - 1) (a step embedding); None:
        one per step.
    create_graph: keep the graph of each gradient so a loss on the ys trains the energy
        model through the descent (training); off for inference.
    detach: start each step from a detached candidate, so each step is its own graph.
    truncate: only the last step keeps create_graph.
    langevin_std: Gaussian noise added to y before each step.
    random_step_size: s > 1 draws one step size per energy (text: per token) from
        U[alpha/s, alpha*s], once for the whole descent.
    tolerance: stop a position once a step lowers its energy by less than this, measured on
        the landscape that step descended (inference); the loop ends when all have stopped.
    final_energy: also score the final state (one more forward; training skips it).
    on_step: called as on_step(k, y) with the state after step k; returns the state to go on
        from (training backpropagates each step's loss there, see Thinker.descend_and_learn).
        With create_graph, ys then keeps only the start and the last state.
    gradient: how (energy, dE/dx) are computed (traced_energy_and_gradient when compiled).
    """
    normalize = normalize or (lambda t: t)
    landscape = lambda k: k if landscapes is None else min(k, landscapes - 1)
    ys, energies, active, steps_used = [y], [], None, None
    with torch.enable_grad():
        for k in range(steps):
            before = y if tolerance is not None else None
            if langevin_std > 0:
                y = y + langevin_std * torch.randn_like(y)
            x = normalize(y)
            if create_graph and on_step is not None and k > 0:
                ys[-1] = None  # on_step has taken it, and in training each state is (B, S, V)
            if detach or not create_graph or not x.requires_grad:
                x = x.detach().requires_grad_()
            keep_graph = create_graph and (not truncate or k == steps - 1)
            energy, grad = gradient(energy_fn, x, landscape(k), keep_graph)
            if tolerance is not None:
                if active is None:
                    active = torch.ones_like(energy, dtype=torch.bool)
                    steps_used = torch.zeros_like(energy, dtype=torch.long)
                else:  # freeze positions the last step hardly lowered, on the landscape it descended
                    with torch.no_grad():
                        after = energy if landscape(k) == landscape(k - 1) else energy_fn(x, landscape(k - 1))
                    active = active & (energies[-1] - after.detach() > tolerance)
                if not active.any():
                    break  # every position has settled: the remaining steps would change nothing
                steps_used = steps_used + active.long()
            if random_step_size > 1 and k == 0:  # a factor per scored item, drawn once
                shape = energy.shape + (1,) * (x.dim() - energy.dim())
                factor = torch.empty(shape, device=x.device, dtype=x.dtype).uniform_(1 / random_step_size, random_step_size)
            alpha = step_size * factor if random_step_size > 1 else step_size
            # inference: no graph back to x (alpha may still carry one, if learned)
            y = (x if create_graph else x.detach()) - alpha * grad
            if active is not None:  # a frozen position keeps its state
                y = torch.where(active.reshape(active.shape + (1,) * (y.dim() - active.dim())), y, before)
            if on_step is not None:
                y = on_step(k, y)
            energies.append(energy if keep_graph else energy.detach())
            ys.append(y)
    if final_energy:
        with torch.no_grad():
            energies.append(energy_fn(normalize(y.detach()), landscape(len(ys) - 2)))
    return Trajectory(ys, energies, steps_used)


def backward_requested(backward_scale):
    """Models given a backward_scale backpropagate their own loss (scaled by it), when grad is on."""
    return backward_scale is not None and torch.is_grad_enabled()


class Thinker:
    """What every EBT (text or image) shares: a step size alpha, learned (optionally) with its
    own learning rate and no weight decay, and the config's thinking options passed to think().
    The model defines self.config, self.raw_step_size and self.normalize (None: the identity)."""
    thinks = True  # forward takes steps= and generator= (see evaluate)
    normalize = None
    inference_gradient = staticmethod(energy_and_gradient)  # compile_model swaps in a compiled one

    def step_size(self):
        """alpha, kept >= 1e-3 in value; the gradient passes the clamp, so alpha can come back."""
        raw = self.raw_step_size
        return raw + (raw.clamp(min=1e-3) - raw).detach()

    def differentiates_twice(self):
        """Whether the energy's gradient will itself be differentiated: only in training through
        the descent (then attention must be explicit: the fused kernels have no second derivative)."""
        return self.training and torch.is_grad_enabled()

    def trained_steps(self):
        """The most steps training takes (S2: 2 or 3, so 3): what inference thinks by default."""
        return self.config.think_steps + self.config.random_steps

    def draw_steps(self, rng=random):
        """Training's step count, think_steps + U{0..random_steps} (a Python rng: no device read)."""
        return self.config.think_steps + rng.randrange(self.config.random_steps + 1)

    def descend(self, energy_fn, y0, steps=None, step_size=None, tolerance=None, langevin_std=0.0, on_step=None):
        """think() with this model's options; training adds the System 2 randomness and the
        second-order graph."""
        cfg, train = self.config, self.training
        if steps is None:
            steps = self.draw_steps() if train else self.trained_steps()
        if step_size is None:  # at inference nothing is learned: no graph to alpha
            step_size = self.step_size() if train else self.step_size().detach()
        return think(energy_fn, y0, steps, step_size, normalize=self.normalize, landscapes=cfg.landscapes,
                     create_graph=train, detach=cfg.detach, truncate=cfg.truncate,
                     langevin_std=cfg.langevin_std if train else langevin_std,
                     random_step_size=cfg.random_step_size if train else 1.0,
                     tolerance=tolerance, final_energy=not train, on_step=on_step,
                     gradient=energy_and_gradient if train else self.inference_gradient)

    def descend_and_learn(self, energy_fn, y0, target, loss_fn, steps=None, backward_scale=None, leaves=()):
        """Think from y0 and score every step with loss_fn(y, target); the loss is their mean (S1),
        or with truncate the last one (S2). With backward_scale (training), loss x backward_scale
        is backpropagated here into the parameters and `leaves` (what energy_fn reads, see
        TextEBT.forward), not into the candidate a step starts from, which would cost a
        (B, S, D) x (D, V) product and a (B, S, V) buffer. When the graph is cut between steps
        (detach) or only the last step is trained (truncate), the weighted steps' graphs share only
        the parameters and the leaves, so each step's loss is backpropagated at once: the same
        gradient with one step's second-order graph alive instead of all. Otherwise (detach=False
        without truncate) a later step's loss reaches back through the earlier steps, and the
        whole descent is backpropagated once at the end.
        Returns (trajectory, loss, metrics as tensors)."""
        steps = steps or (self.draw_steps() if self.training else self.trained_steps())
        weights = [0.0] * (steps - 1) + [1.0] if self.config.truncate else [1.0 / steps] * steps
        backward_here = backward_requested(backward_scale)
        stepwise = backward_here and (self.config.detach or self.config.truncate)
        inputs = [p for p in self.parameters() if p.requires_grad] + list(leaves) if backward_here else None
        losses = []

        def learn(k, y):
            loss = loss_fn(y, target)
            losses.append(loss.detach() if stepwise else loss)
            if stepwise and weights[k]:
                (loss * (weights[k] * backward_scale)).backward(inputs=inputs)
                return y.detach()
            return y
        traj = self.descend(energy_fn, y0, steps, on_step=learn)
        loss = sum(w * l for w, l in zip(weights, losses) if w)
        if backward_here and not stepwise:
            (loss * backward_scale).backward(inputs=inputs)
            loss = loss.detach()
        # energy_last: in training the energy the last step started from (no final scoring), in
        # evaluation the final state's
        metrics = {"loss": loss.detach(), "loss_first": losses[0].detach(), "loss_last": losses[-1].detach(),
                   "energy_first": traj.energies[0].detach().mean(), "energy_last": traj.energies[-1].detach().mean(),
                   "step_size": self.step_size().detach()}
        if not self.training:
            metrics["loss_per_step"] = torch.stack(losses).detach()
        return traj, loss, metrics

    def param_groups(self, weight_decay):
        """AdamW groups (decay_groups, section 6): decay matrices, not gains; a learned step size has
        its own lr, no decay."""
        others = [p for n, p in self.named_parameters() if n != "raw_step_size"]
        groups = decay_groups(others, weight_decay)
        if self.raw_step_size.requires_grad:
            groups.append({"params": [self.raw_step_size], "weight_decay": 0.0,
                           "lr_mult": self.config.step_size_lr_mult})
        return groups


# -----------------------------------------------------------------------------
# 4a. The autoregressive text EBT

class TextEBT(Thinker, nn.Module):
    """Scores, for every position i, a candidate distribution over the next token.

    Two streams share one set of blocks: the context tokens (ordinary causal
    attention) and one prediction token per position, embedded from its candidate
    distribution p as p @ W. The context never looks at predictions, so its keys and
    values are computed once and reused at every thinking step.
    """
    normalize = staticmethod(lambda logits: logits.softmax(-1))  # the candidate is a distribution

    def __init__(self, cfg):
        super().__init__()
        assert cfg.model == "ebt"
        self.config = cfg
        self.trunk = Trunk(cfg)
        self.pred_emb = nn.Linear(cfg.vocab_size, cfg.n_embd, bias=False)  # probs -> embedding
        self.step_emb = nn.Embedding(cfg.landscapes, cfg.n_embd)
        self.norm = RMSNorm(cfg.n_embd)
        self.energy_head = nn.Linear(cfg.n_embd, 1, bias=False)
        self.apply(init_weights)
        # p @ W averages rows of W, so at std 0.02 a step embedding of the same std would drown
        # the candidate: W is xavier-normal (the paper's init) and the step embeddings start at zero.
        nn.init.xavier_normal_(self.pred_emb.weight)
        nn.init.zeros_(self.step_emb.weight)
        self.raw_step_size = nn.Parameter(torch.tensor(float(cfg.step_size)), requires_grad=cfg.learn_step_size)
        self.replay = ReplayBuffer(cfg.replay_size) if cfg.replay_size else None

    def context(self, idx, cache=None):
        """Per-layer (k, v) of the context stream, each (B, H, T, Dh)."""
        return self.trunk(idx, cache)[1]

    def energy(self, probs, context, landscape):
        """probs: (B, P, V) candidate distributions of the next token after each of the last P
        context tokens. Returns energies (B, P)."""
        x = self.pred_emb(probs) + self.step_emb.weight[landscape]
        double_backward = self.differentiates_twice()
        for block, kv in zip(self.trunk.blocks, context):
            x = block.forward_predictions(x, self.trunk.rotary, kv, double_backward)
        return self.energy_head(self.norm(x)).squeeze(-1)

    def initial_logits(self, B, P, device, generator=None):
        """Random starting logits (B, P, V) from N(0, init_std^2); a generator (on the CPU)
        makes them repeatable."""
        shape, dtype = (B, P, self.config.vocab_size), self.pred_emb.weight.dtype
        if generator is None:
            return self.config.init_std * torch.randn(shape, device=device, dtype=dtype)
        return self.config.init_std * torch.randn(shape, generator=generator, dtype=dtype).to(device)

    def predict(self, idx, steps=None, step_size=None, y0=None, context=None, tolerance=None, langevin_std=0.0):
        """Think from random logits at every position of idx: (B, T). Returns a Trajectory
        whose ys are (B, T, V) logits and energies (B, T). idx may be None when context and
        y0 are given."""
        context = self.context(idx) if context is None else context
        y0 = self.initial_logits(*idx.shape, idx.device) if y0 is None else y0
        return self.descend(lambda p, k: self.energy(p, context, k), y0, steps, step_size, tolerance, langevin_std)

    def think_candidates(self, context, P, candidates=1, generator=None, *, y0=None, steps=None, step_size=None,
                         langevin_std=None, tolerance=None):
        """Think from `candidates` random starts about each of the last P positions of a
        context, all sharing its (k, v): only the prediction tokens are run. langevin_std
        defaults to the paper's inference noise, 1, when there are several candidates (the
        softmax all but erases their different starts), else 0. y0: the starts (B * N, P, V), drawn
        here if None. Returns a Trajectory with ys (B, N, P, V), energies (B, N, P) and, when
        stopping adaptively, steps_used (B, N, P)."""
        k0 = context[0][0]
        B, N = k0.shape[0], candidates
        if langevin_std is None:
            langevin_std = VERIFY_LANGEVIN_STD if N > 1 else 0.0
        if N > 1:  # a view, not a copy: every candidate reads the same keys and values
            context = [tuple(t[:, None].expand(B, N, *t.shape[1:]).flatten(0, 1) for t in kv) for kv in context]
        y0 = self.initial_logits(B * N, P, k0.device, generator) if y0 is None else y0
        traj = self.predict(None, steps, step_size, y0=y0, context=context, tolerance=tolerance,
                            langevin_std=langevin_std)
        per_candidate = lambda t: None if t is None else t.unflatten(0, (B, N))
        return Trajectory([per_candidate(y) for y in traj.ys], [per_candidate(e) for e in traj.energies],
                          per_candidate(traj.steps_used))

    def next_token(self, idx, cache, generator=None, candidates=1, **thinking):
        """One step of generation: extend the context cache with idx (B, T_new), then think about
        the token after it with one prediction token per candidate against the cached keys,
        keeping the candidate with the lowest final energy (self-verification).
        thinking: steps, step_size, langevin_std, tolerance (see think).
        Returns the kept logits (B, V), the cache and per-token diagnostics."""
        # drawn first: the compiler cannot trace the generator, so a compiled token breaks here only
        y0 = self.initial_logits(len(idx) * candidates, 1, idx.device, generator)
        cache = self.context(idx, cache)
        traj = self.think_candidates(cache, 1, candidates, y0=y0, **thinking)
        final = traj.energies[-1]  # (B, N, 1)
        steps_used = traj.steps_used if traj.steps_used is not None else torch.full_like(
            final, len(traj.ys) - 1, dtype=torch.long)
        diagnostics = {"energy": keep_lowest(final, final)[:, 0],                            # (B,)
                       "candidate_energy": final[..., 0],                                    # (B, N)
                       "steps_used": keep_lowest(steps_used, final)[:, 0],                   # (B,)
                       "trajectory": keep_lowest(torch.stack(traj.energies, -1), final)[:, 0]}  # (B, K+1)
        return keep_lowest(traj.ys[-1], final)[:, 0], cache, diagnostics

    def forward(self, idx, targets, steps=None, generator=None, backward_scale=None):
        """Cross-entropy after each thinking step; the loss is their mean, or with truncate the
        last one. In training with a replay buffer, replay_batch x the batch of earlier sequences
        joins the batch, each starting from the logits its last descent ended at.
        backward_scale: backpropagate loss x backward_scale here (one thinking step at a time
        where the steps' graphs allow, see Thinker.descend_and_learn), and return the loss detached.
        Metrics are tensors: reading them synchronises with the device."""
        y0 = self.initial_logits(*idx.shape, idx.device, generator)
        fresh = len(idx)
        if self.training and self.replay is not None:
            idx, targets, y0 = self.replay.extend(idx, targets, y0, round(self.config.replay_batch * fresh))
        backward_here = backward_requested(backward_scale)
        if backward_here:
            # The steps' losses reach the context stream through its keys and values as leaves.
            # Its graph is not kept through the thinking steps: the stream runs again at the end,
            # to take their summed gradient (one more forward, for the memory of all its activations).
            with torch.no_grad():
                context = [tuple(t.requires_grad_() for t in layer) for layer in self.context(idx)]
        else:
            context = self.context(idx)
        cross_entropy = lambda y, t: F.cross_entropy(y.flatten(0, 1), t.flatten())
        leaves = [t for layer in context for t in layer] if backward_here else ()
        traj, loss, metrics = self.descend_and_learn(lambda p, k: self.energy(p, context, k), y0, targets,
                                                     cross_entropy, steps, backward_scale, leaves)
        if backward_here:
            torch.autograd.backward([t for layer in self.context(idx) for t in layer], [t.grad for t in leaves])
        if self.training and self.replay is not None:
            self.replay.add(idx[:fresh], targets[:fresh], traj.ys[-1][:fresh])
        return loss, metrics


class ReplayBuffer:
    """The paper's S2 replay buffer (model/replay_buffer.py, flag mcmc_replay_buffer): the final
    logits of the last `size` training sequences, replayed as starting points so that training
    sees longer descents than it pays for. It lives on the model, outside its state_dict (each
    process keeps its own); train() checkpoints `kept`."""

    def __init__(self, size):
        self.size, self.kept = size, {}  # "idx", "targets" (N, S) and "logits" (N, S, V)

    def extend(self, idx, targets, y0, n):
        """The batch plus up to n stored sequences drawn at random (torch's global generator),
        which start from their stored logits instead of y0."""
        n = min(n, len(self.kept.get("idx", ())))
        if n == 0:
            return idx, targets, y0
        pick = torch.randperm(len(self.kept["idx"]))[:n].to(idx.device)
        return tuple(torch.cat([t, self.kept[k][pick].to(t.dtype)]) for k, t in (("idx", idx), ("targets", targets),
                                                                                  ("logits", y0)))

    def add(self, idx, targets, logits):
        new = {"idx": idx, "targets": targets, "logits": logits.detach()}
        self.kept = {k: (torch.cat([self.kept[k], t]) if self.kept else t)[-self.size:] for k, t in new.items()}


def keep_lowest(x, final_energy):
    """Self-verification: from x (B, N, P, ...) keep, at every position, the candidate whose
    final energy (B, N, P) is lowest (never a NaN one, unless all are). Returns (B, P, ...)."""
    best = final_energy.nan_to_num(nan=float("inf")).argmin(1, keepdim=True)  # (B, 1, P)
    return torch.take_along_dim(x, best.reshape(best.shape + (1,) * (x.dim() - 3)), dim=1).squeeze(1)


# -----------------------------------------------------------------------------
# 4b. The Transformer++ baseline: the same blocks, ordinary next-token prediction

class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.model == "transformer"
        self.config = cfg
        self.trunk = Trunk(cfg)
        self.norm = RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(init_weights)

    def logits(self, idx, cache=None):
        h, kvs = self.trunk(idx, cache)
        return self.lm_head(self.norm(h)), kvs  # (B, T, V)

    def next_token(self, idx, cache, generator=None):
        """One step of generation: logits (B, V) for the token after idx (B, T_new), given the
        cache of earlier tokens. Nothing is drawn at random here, and there is nothing to report."""
        logits, cache = self.logits(idx, cache)
        return logits[:, -1], cache, {}

    def forward(self, idx, targets, backward_scale=None):
        logits, _ = self.logits(idx)
        loss = backpropagated(F.cross_entropy(logits.flatten(0, 1), targets.flatten()), backward_scale)
        return loss, {"loss": loss.detach()}


def backpropagated(loss, backward_scale):
    """What models do with backward_scale: backpropagate loss x backward_scale, return it detached."""
    if not backward_requested(backward_scale):
        return loss
    (loss * backward_scale).backward()
    return loss.detach()


def build_model(cfg, seed=None):
    """seed: makes the initial weights repeatable (training seeds its own batches and noise)."""
    if seed is not None:
        torch.manual_seed(seed)
    kinds = {"ebt": TextEBT, "transformer": Transformer, "image_ebt": ImageEBT, "image_dit": ImageDiT,
             "image_regressor": ImageRegressor}
    return kinds[cfg.model](cfg)


# -----------------------------------------------------------------------------
# 5. Text data and tokenizers

SHAKESPEARE = Path(__file__).resolve().parent / "data" / "tinyshakespeare.txt.gz"  # ships with nanoEBT
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def read_text(path, flag="--data"):
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; pass a text file with {flag}")
    if not path.is_file():
        raise UsageError(f"{flag} {path} does not exist; pass an existing text file with {flag}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{flag} {path} is not readable UTF-8 text ({e})") from None
    if not text:
        raise UsageError(f"{flag} {path} is empty; pass a text file with {flag}")
    return text


def sha256_text(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shakespeare():
    """Tiny Shakespeare, from the compressed copy in data/ (checked against its checksum)."""
    import gzip
    try:
        raw = gzip.decompress(SHAKESPEARE.read_bytes())
    except OSError as e:
        raise UsageError(f"{SHAKESPEARE} is missing or damaged ({e}); restore it from git, or pass --data") from None
    if hashlib.sha256(raw).hexdigest() != SHAKESPEARE_SHA256:
        raise UsageError(f"{SHAKESPEARE} does not hold Tiny Shakespeare (checksum); restore it from git, or pass --data")
    return raw.decode("utf-8")


def text_or_shakespeare(path=None):
    """The text at path, or Tiny Shakespeare (shipped)."""
    return read_text(path) if path else shakespeare()


class CharTokenizer:
    def __init__(self, chars):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    @classmethod
    def fit(cls, text):
        return cls(sorted(set(text)))

    def encode(self, text):
        missing = sorted(set(text) - set(self.index))
        if missing:
            raise UsageError(f"characters not in the vocabulary: {''.join(missing)!r}")
        return [self.index[c] for c in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def state(self):
        return {"kind": "char", "chars": "".join(self.chars)}


class GPT2Tokenizer:
    def __init__(self):
        try:
            import tiktoken
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken fetches its BPE files on first use
            raise UsageError(f"could not load the gpt2 tokenizer through tiktoken ({type(e).__name__}: {e}); "
                             "it needs its files cached or network access, or use --tokenizer char") from None
        self.vocab_size = self.enc.n_vocab

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def state(self):
        return {"kind": "gpt2"}


def tokenizer_from_state(state):
    return CharTokenizer(state["chars"]) if state["kind"] == "char" else GPT2Tokenizer()


def random_windows(ids, length, count, generator):
    """count random windows of a 1-D token tensor: inputs (count, length) and next-token targets."""
    start = torch.randint(len(ids) - length, (count,), generator=generator)
    chunk = ids[start[:, None] + torch.arange(length + 1)]
    return chunk[:, :-1], chunk[:, 1:]


class TextData:
    """A token stream split 90/10 into train and validation; batches are random windows."""

    def __init__(self, ids, block_size, source="text"):
        ids = torch.tensor(ids, dtype=torch.long)
        n_val = max(len(ids) // 10, block_size + 1)
        if len(ids) - n_val < block_size + 1:
            raise UsageError(f"{source} has {len(ids)} tokens: too short for block size {block_size} "
                             f"(needs at least {2 * (block_size + 1)}); use more text or a smaller --block_size")
        self.split = {"train": ids[:-n_val], "val": ids[-n_val:]}
        self.block_size = self.tokens_per_sample = block_size

    def batch(self, split, batch_size, generator):
        return random_windows(self.split[split], self.block_size, batch_size, generator)


# -----------------------------------------------------------------------------
# 6. Training loop, checkpoints, command-line helpers

@dataclass
class TrainConfig:
    max_steps: int = 5000
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_batches: int = 20
    eval_steps: int = 0           # EBT: think this many steps at evaluation (0: 2x the trained steps)
    log_interval: int = 10
    out_dir: str = "out"
    device: str = "auto"
    seed: int = 1337
    compile: bool = False         # torch.compile the model and its thinking (see compile_model)

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "eval_batches", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r}: must be >= 1")
        for name in ("lr", "warmup_steps", "weight_decay", "grad_clip", "eval_steps"):
            if getattr(self, name) < 0 or not math.isfinite(getattr(self, name)):
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r}: must be finite and >= 0")
        if self.lr == 0:
            raise ConfigError("TrainConfig.lr=0: must be > 0")


def pick_device(name="auto"):
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
    if name == "auto":
        return "cuda" if available["cuda"] else "mps" if available["mps"] else "cpu"
    if name.split(":")[0] not in available:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    if not available[name.split(":")[0]]:
        raise UsageError(f"device {name!r} is not available on this machine; use --device auto or cpu")
    return name


def autocast(device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    if str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def compile_model(model):
    """torch.compile the forward (the loss) of a model that does not think: the Transformer++ (its
    generation stays eager), the DiT, the image regressor. For an EBT: its context stream, and at
    inference each thinking step (energy and gradient, traced by torch.func) and each generated token whole
    (context, thinking, choice of candidate). Training thinks eagerly: in torch 2.13 a compiled
    training-mode step gave wrong gradients once the compiler had seen changing shapes (README
    "Speed and memory"). Bound methods keep checkpoints' parameter names."""
    if not getattr(model, "thinks", False):
        model.forward = torch.compile(model.forward)
        return model
    model.inference_gradient = torch.compile(traced_energy_and_gradient)
    if hasattr(model, "trunk"):  # the image EBT has no context stream
        model.trunk.forward = torch.compile(model.trunk.forward)
        model.next_token = torch.compile(model.next_token)
    return model


def param_groups(model, weight_decay):
    """AdamW groups: the model's own (a thinker's step size), else decay_groups."""
    return model.param_groups(weight_decay) if hasattr(model, "param_groups") else decay_groups(
        model.parameters(), weight_decay)


def decay_groups(params, weight_decay):
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr_mult": 1.0},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_mult": 1.0}]


def lr_at(step, tc):
    """Linear warm-up, then cosine decay to lr/10."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def write_atomically(path, write):
    """write(tmp) to a temporary file, then rename it to path: a crash leaves the old file or the
    new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(path, state):
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, device="cpu"):
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"checkpoint {path} is a directory; pass the ckpt.pt file inside it")
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UsageError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UsageError(f"checkpoint {path} is not a nanoEBT checkpoint")
    return ckpt


def model_from_checkpoint(ckpt, device="cpu", **overrides):
    """overrides: config fields to change, e.g. a longer block_size (weights do not depend on it)."""
    model = build_model(ModelConfig.from_dict({**ckpt["model_config"], **overrides}))
    model.load_state_dict(ckpt["model"])
    return model.to(device)


def read_records(path):
    """The records of a metrics.jsonl; a last line torn by a crash mid-write is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


@torch.no_grad()
def evaluate(model, data, tc, device):
    """Mean validation metrics over fixed batches and fixed starting noise, so evaluations
    at different times are comparable. Models that think (model.thinks) think for
    tc.eval_steps (default twice the trained steps) and report the loss after each step;
    their "loss" (and "psnr") is the one after the trained number of steps."""
    model.eval()
    g = torch.Generator().manual_seed(tc.seed + 1)
    thinks = getattr(model, "thinks", False)
    thinking = {"steps": tc.eval_steps or 2 * model.trained_steps(), "generator": g} if thinks else {}
    totals = {}
    for _ in range(tc.eval_batches):
        x, y = data.batch("val", tc.batch_size, generator=g)
        with autocast(device):
            _, m = model(x.to(device), y.to(device), **thinking)
        for k, v in m.items():
            totals[k] = totals.get(k, 0) + v.double()
    model.train()
    m = {k: (v / tc.eval_batches).tolist() for k, v in totals.items()}
    if thinks:  # "loss" (and an image EBT's "psnr") after the trained number of steps
        trained = min(model.trained_steps(), len(m["loss_per_step"])) - 1
        m["loss"] = m["loss_per_step"][trained]
        if "psnr_per_step" in m:
            m["psnr"] = m["psnr_per_step"][trained]
    return m


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def plot_metrics(records, path):
    """Loss curve PNG from the metrics log: the training loss smoothed (raw, faint), and the
    validation loss (an EBT's after 1, the trained and the most evaluated thinking steps)."""
    fig = figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    train, val = ([r for r in records if r["kind"] == kind] for kind in ("train", "eval"))
    if train:
        steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
        ax.plot(steps, losses, color="C0", alpha=0.25, lw=0.8)
        smooth = list(itertools.accumulate(losses, lambda avg, loss: 0.9 * avg + 0.1 * loss))
        ax.plot(steps, smooth, color="C0", label="train loss (smoothed; raw faint)")
    K = len(val[0].get("loss_per_step", [])) if val else 0
    trained = val[0]["loss_per_step"].index(val[0]["loss"]) if K else None  # evaluate() took "loss" from there
    for k in sorted({0, trained, K - 1}) if K else []:
        ax.plot([r["step"] for r in val], [r["loss_per_step"][k] for r in val], marker="o",
                label=f"val loss, {k + 1} thinking step{'s' if k else ''}{' (as trained)' if k == trained else ''}")
    if val and not K:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], marker="o", label="val loss")
    ax.set(xlabel="optimizer step", ylabel="loss (nats per token)", title=f"training: {Path(path).parent.name}")
    if ax.get_legend_handles_labels()[0]:  # nothing yet when stopped before the first log
        ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


def figure(**kw):
    """A matplotlib Figure (no pyplot state) that Jupyter shows as a picture by itself."""
    import io
    from matplotlib.figure import Figure
    fig = Figure(**kw)

    def png():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        return buffer.getvalue()
    fig._repr_png_ = png
    return fig


class NonFiniteError(Exception):
    pass


def distributed_setup(device):
    """Under torchrun (RANK/WORLD_SIZE set) join the process group: nccl on GPUs, gloo
    on CPU. Returns (rank, world_size, device for this rank)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def batch_seed(seed, step, micro_step):
    """Training randomness is a function of (seed, step): a resumed run replays exactly
    what an uninterrupted one would have drawn, and the step is the data position."""
    return seed + 1_000_003 * step + 7919 * micro_step


def interrupt(signum, frame):
    """Schedulers stop jobs with SIGTERM: train() treats it like Ctrl-C, so the run is saved."""
    raise KeyboardInterrupt


def prepare_out_dir(out, resume):
    """Never overwrite an earlier run's checkpoint (a run killed before its first one left only
    its log, which a fresh start replaces); remove what a crash during a save left behind."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out_dir {out} is a file, not a directory; pass a directory")
    if not resume and (out / "ckpt.pt").exists():
        raise UsageError(f"{out} already holds a run; continue it with --resume, or pass another --out_dir")
    for stale in out.glob("*.tmp") if out.is_dir() else ():
        stale.unlink()


def check_fits(cfg, batch_size, tokens, device):
    """Refuse at once a batch whose largest single tensor (activations, logits, or the EBT's explicit
    attention scores) alone would outgrow the device: a lower bound, passing it promises nothing."""
    sizes = {"activations": batch_size * tokens * cfg.n_embd, "logits": batch_size * tokens * cfg.vocab_size}
    if cfg.model == "ebt":
        sizes["attention scores"] = batch_size * cfg.n_head * tokens * tokens
    what, largest = max(sizes.items(), key=lambda kv: kv[1])
    memory = (torch.cuda.get_device_properties(torch.device(device)).total_memory if device.startswith("cuda")
              else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))  # CPU: physical memory
    if 4 * largest > memory:
        raise UsageError(f"batch {batch_size} x {tokens} tokens cannot fit on {device}: its {what} alone take "
                         f"{4 * largest / 2**30:,.0f} GiB of {memory / 2**30:,.0f}; "
                         "lower --batch_size (--grad_accum keeps the batch) or --block_size")


def is_out_of_memory(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(e) or "out of memory" in str(e)


def average_gradients(model, world):
    """One all-reduce of all gradients, flattened (DDP's hooks can't take an EBT's several backwards)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads]) / world
    torch.distributed.all_reduce(flat)
    for g, new in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(new.view_as(g))


def train(model, data, tc, meta=None, resume=False, log=None):
    """The training loop shared by the text and image drivers; runs as it is under
    torchrun (data parallel, one process per device).

    model(x, y, backward_scale=s) -> (loss, metrics dict of tensors), having backpropagated loss x s;
    param_groups(model, weight_decay) -> AdamW groups.
    data.batch(split, batch_size, generator) -> (x, y); data.tokens_per_sample.
    tc.batch_size is per process: each of N processes takes its slice of a global batch
    of N x batch_size drawn from the same generator, so the run matches one process with
    N times the batch. The host waits for the device only on log and eval steps.
    meta: extra entries stored in the checkpoint (e.g. the tokenizer).
    Rank 0 writes out_dir/ckpt.pt, out_dir/metrics.jsonl and out_dir/loss.png; with a replay
    buffer, rank r > 0 keeps its own in out_dir/replay-rank{r}.pt.
    """
    log = log or (lambda *a: print(*a, flush=True))  # flushed: progress shows in files and under nohup
    rank, world, device = distributed_setup(pick_device(tc.device))
    master = rank == 0
    log = log if master else (lambda *a: None)
    out = Path(tc.out_dir)
    prepare_out_dir(out, resume)
    ckpt_path, log_path, replay_path = out / "ckpt.pt", out / "metrics.jsonl", out / f"replay-rank{rank}.pt"
    if model.config.model in TEXT_KINDS:
        check_fits(model.config, tc.batch_size, data.tokens_per_sample, device)
    model.to(device)
    thinks, replay = getattr(model, "thinks", False), getattr(model, "replay", None)
    if tc.compile:
        compile_model(model)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95),
                                  fused=device.startswith("cuda"))
    step, records, saved = 0, [], None
    if resume:
        ckpt = load_checkpoint(ckpt_path, device)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UsageError(f"checkpoint {ckpt_path} does not fit this model ({str(e).splitlines()[0]})") from None
        step = saved = ckpt["step"]
        if replay is not None:
            kept = ckpt.get("replay") if master else (
                torch.load(replay_path, weights_only=True) if replay_path.exists() else None)
            if kept is not None and (master or kept["step"] == step):
                replay.kept = {k: t.to(device) for k, t in (kept if master else kept["replay"]).items()}
        if log_path.exists():
            records = [r for r in read_records(log_path) if r["step"] <= step]
        log(f"resumed from {ckpt_path} at step {step}" + (
            f"; nothing to train: max_steps is {tc.max_steps} (raise --max_steps to go on)" if step >= tc.max_steps else ""))
    if world > 1:  # every rank starts from rank 0's weights
        for t in model.state_dict().values():
            torch.distributed.broadcast(t, 0)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(log_path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in records)))

    def checkpoint():
        nonlocal saved
        if replay is not None and not master:
            save_checkpoint(replay_path, {"step": step, "replay": replay.kept})
        if master:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "model_config": asdict(model.config), "train_config": asdict(tc),
                "step": step,  # also the data position: batches are a function of (seed, step)
                **({"replay": replay.kept} if replay is not None else {}), **(meta or {})})
        saved = step

    def record(r):
        records.append(r)
        with open(log_path, "a") as f:
            f.write(json.dumps(r) + "\n")

    def all_finite(nonfinite):
        """One sync; under torchrun every rank takes the same decision."""
        if world > 1:
            nonfinite = nonfinite.float()
            torch.distributed.all_reduce(nonfinite, op=torch.distributed.ReduceOp.MAX)
        return not bool(nonfinite)

    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = tc.batch_size * tc.grad_accum * world * data.tokens_per_sample
    log(f"{model.config.model}: {n_params / 1e6:.2f}M parameters, device {device} x {world}, "
        f"{tc.batch_size * tc.grad_accum * world} x {data.tokens_per_sample} tokens per step")
    t0, start_step = time.time(), step
    t_last, step_last = t0, step  # throughput since the last log or evaluation
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # since the last check, on the device
    in_main_thread, together = threading.current_thread() is threading.main_thread(), True  # all ranks end alike
    previous = signal.signal(signal.SIGTERM, interrupt) if in_main_thread else None
    try:
        while step < tc.max_steps:
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            # one step count per optimizer step, the same on every rank and micro-step
            thinking = {"steps": model.draw_steps(random.Random(batch_seed(tc.seed, step, -1)))
                        } if thinks else {}
            for micro in range(tc.grad_accum):
                g = torch.Generator().manual_seed(batch_seed(tc.seed, step, micro))
                x, y = data.batch("train", tc.batch_size * world, g)
                x, y = x.chunk(world)[rank].to(device), y.chunk(world)[rank].to(device)
                torch.manual_seed(batch_seed(tc.seed, step, micro) + rank)  # thinking noise, replay picks
                with autocast(device):  # the model backpropagates (an EBT one thinking step at a time)
                    loss, metrics = model(x, y, backward_scale=1 / tc.grad_accum, **thinking)
                nonfinite |= ~torch.isfinite(loss)
            if world > 1:
                average_gradients(model, world)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
            nonfinite |= ~torch.isfinite(grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            logging = step % tc.log_interval == 0 or step == tc.max_steps
            evaluating = step % tc.eval_interval == 0 or step == tc.max_steps
            if (logging or evaluating) and not all_finite(nonfinite):
                raise NonFiniteError(f"the loss or the gradient became NaN or infinite by step {step}")
            if logging and world > 1:  # report the loss over the global batch
                torch.distributed.all_reduce(metrics["loss"])
                metrics["loss"] /= world
            if master and logging:
                metrics, now = {k: v.item() for k, v in metrics.items()}, time.time()
                tok_s = tokens_per_step * (step - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, step
                eta = (now - t0) / (step - start_step) * (tc.max_steps - step)
                cuda = device.startswith("cuda")
                memory = {"peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20} if cuda else {}
                record({"kind": "train", "step": step, "lr": lr, "grad_norm": grad_norm.item(),
                        "tokens_per_s": tok_s, "elapsed_s": now - t0, **memory, **metrics})
                line = f"step {step}/{tc.max_steps} | loss {metrics['loss']:.4f}"
                if "loss_first" in metrics:  # each step's energy on that step's own landscape
                    line += (f" (step1 {metrics['loss_first']:.3f}, last {metrics['loss_last']:.3f})"
                             f" | E at step1 {metrics['energy_first']:.2f}, at last {metrics['energy_last']:.2f}"
                             f" | alpha {metrics['step_size']:.1f}")
                quality = f" | psnr {metrics['psnr']:.2f}" if "psnr" in metrics else ""
                memory = f" | peak {memory['peak_mem_mb'] / 1024:.1f} GB" if memory else ""
                log(line + f"{quality} | {tok_s / 1e3:.1f}k tok/s{memory} | ETA {format_time(eta)}")
            if evaluating:
                if master:
                    m = evaluate(model, data, tc, device)
                    record({"kind": "eval", "step": step, **m})
                    steps = f" after 1..{len(m['loss_per_step'])} thinking steps:" if "loss_per_step" in m else ""
                    quality = " | PSNR " + " ".join(f"{p:.2f}" for p in m["psnr_per_step"]) if "psnr_per_step" in m else ""
                    log(f"eval step {step} | val loss{steps} "
                        + " ".join(f"{l:.4f}" for l in m.get("loss_per_step", [m["loss"]])) + quality)
                checkpoint()
                if master:
                    plot_metrics(records, out / "loss.png")
                t_last, step_last = time.time(), step  # throughput counts training only
    except KeyboardInterrupt:
        if bool(nonfinite):
            log(f"interrupted at step {step}; not saved: the run had become non-finite")
        else:
            checkpoint()
            if master:
                plot_metrics(records, out / "loss.png")
            log(f"interrupted at step {step}; saved {ckpt_path} (continue with --resume)")
        raise  # the driver stops here (exit code 130), before any report on a half-trained model
    except NonFiniteError as e:
        kept = (f"the last good checkpoint is {ckpt_path} (step {saved})" if saved is not None else
                f"no checkpoint was written yet (the first comes at step {tc.eval_interval})")
        raise UsageError(f"training stopped: {e}; {kept}; try a lower --lr or --step_size") from None
    except RuntimeError as e:
        together = False  # this rank alone: the others may be anywhere
        if not is_out_of_memory(e):
            raise
        raise UsageError(f"out of memory on {device} with batch {tc.batch_size} x {data.tokens_per_sample}: "
                         "lower --batch_size (--grad_accum keeps the batch) or --block_size") from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if world > 1:
            if together:  # every rank reaches here before any tears down (gloo aborts otherwise)
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    return records


def run_cli(main):
    """Run a driver's main(): user errors and running out of memory become one line on stderr
    and exit code 2; Ctrl-C one line and exit code 130 (training saves before it gets here)."""
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        print("error: out of memory; lower the sizes (--batch_size, --block_size, --candidates, --windows)",
              file=sys.stderr)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """The drivers' parser: no prefix abbreviations (--max_step is not taken for --max_steps) and
    errors as one line, exit code 2 (through run_cli)."""

    def __init__(self, **kw):
        super().__init__(allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def given_flags(args, names):
    """The flags among names that the user gave (the drivers' defaults are None where this matters)."""
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def check_flag(value, name, ok, what):
    """One-line UsageError for a flag value that is NaN or out of range: ok(value) must hold."""
    if value is not None and (value != value or not ok(value)):
        raise UsageError(f"--{name} {value}: must be {what}")


# -----------------------------------------------------------------------------
# 7. Thinking at inference: generation, self-verification, evaluation

def text_model_from_checkpoint(path, device="cpu", **overrides):
    """(model in eval mode, tokenizer) from a text checkpoint; bad files give one-line UsageErrors."""
    ckpt = load_checkpoint(path, device)
    if "tokenizer" not in ckpt:
        raise UsageError(f"checkpoint {path} holds no tokenizer: it is not a text model")
    try:
        model = model_from_checkpoint(ckpt, device, **overrides)
    except (RuntimeError, KeyError, TypeError) as e:
        raise UsageError(f"checkpoint {path} does not fit its own config ({str(e).splitlines()[0]})") from None
    return model.eval(), tokenizer_from_state(ckpt["tokenizer"])


def require_ebt(model, what):
    if not getattr(model, "thinks", False):
        raise UsageError(f"{what} needs an EBT; this checkpoint holds a {model.config.model!r} model")


@dataclass
class Generation:
    """What generate() produced. Per new token: the logits it was sampled from and, for an
    EBT, what thinking went through (None for the Transformer)."""
    idx: torch.Tensor                      # (B, T0 + n) the prompt followed by the n new tokens
    logits: torch.Tensor                   # (B, n, V) the refined logits each token was sampled from
    energy: torch.Tensor = None            # (B, n) final energy of the kept candidate: low = confident
    candidate_energy: torch.Tensor = None  # (B, n, N) final energy of every candidate
    steps_used: torch.Tensor = None        # (B, n) descent steps the kept candidate took
    trajectory: list = None                # n tensors (B, K+1): the kept candidate's energy at the start and after each step


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """Next token ids (B, 1) drawn from softmax(logits / temperature) over the top_k tokens;
    temperature 0 takes the most likely one."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # inverse CDF on the model's device with a uniform from the (CPU) generator: repeatable, and
    # the host never waits for the device
    u = torch.rand(logits.shape[0], 1, generator=generator).to(logits.device, non_blocking=True)
    cdf = logits.float().softmax(-1).cumsum(-1)
    return (cdf < u * cdf[:, -1:]).sum(-1, keepdim=True).clamp(max=logits.shape[-1] - 1)


@torch.no_grad()
def generate(model, idx, num_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True, **thinking):
    """Sample num_tokens tokens after the prompt idx (B, T0) with either model (in eval mode).

    A KV cache of the context stream makes each new token cost one token through the trunk
    plus, for an EBT, the thinking steps of one prediction token (per candidate) against the
    cached keys. The window holds at most block_size tokens; when it would overflow it restarts
    from the last block_size // 2, so the cache is re-filled once per block_size // 2 new tokens.
    use_cache=False recomputes the whole window for every token: same windows, same result.
    thinking (EBT only): candidates, steps, step_size, langevin_std, tolerance (see next_token).
    """
    if thinking:
        require_ebt(model, "thinking options (" + ", ".join(sorted(thinking)) + ")")
    if idx.shape[1] < 1:
        raise UsageError("the prompt is empty; give at least one token")
    if temperature < 0 or (top_k is not None and top_k < 1) or num_tokens < 0:
        raise UsageError(f"need temperature >= 0, top_k >= 1 and num_tokens >= 0 "
                         f"(got {temperature}, {top_k}, {num_tokens})")
    if thinking.get("candidates", 1) < 1 or thinking.get("steps", 1) < 1:
        raise UsageError("need at least 1 candidate and 1 thinking step")
    block, keep = model.config.block_size, max(1, model.config.block_size // 2)
    start, cache, per_token = max(0, idx.shape[1] - block), None, []  # the window is idx[:, start:]
    for _ in range(num_tokens):
        if idx.shape[1] - start > block:
            start, cache = idx.shape[1] - keep, None
        if not use_cache:
            cache = None
        seen = 0 if cache is None else cache[0][0].shape[-2]
        logits, cache, diagnostics = model.next_token(idx[:, start + seen:], cache, generator, **thinking)
        per_token.append((logits, diagnostics))
        idx = torch.cat([idx, sample_next(logits, temperature, top_k, generator)], dim=1)
    out = Generation(idx, torch.stack([l for l, _ in per_token], 1) if per_token else None)
    if per_token and per_token[0][1]:
        stack = lambda name: torch.stack([d[name] for _, d in per_token], 1)
        out.energy, out.candidate_energy, out.steps_used = stack("energy"), stack("candidate_energy"), stack("steps_used")
        out.trajectory = [d["trajectory"] for _, d in per_token]
    return out


@torch.no_grad()
def thinking_curves(model, ids, steps=(1, 2, 4, 8), candidates=(1, 2, 4, 8), windows=16, seed=0):
    """Perplexity on fixed windows of a 1-D token tensor, after each number of thinking steps
    (one candidate), and with each number N of candidates at the trained number of steps, keeping
    the lowest final energy. N = 1 is thinking as trained, without noise (the steps curve at the
    trained count): what self-verification is measured against. N > 1: the first N of max(candidates)
    candidates, each thinking with the paper's inference noise. One descent covers every step count.
    Flat for the Transformer. Repeatable: seed fixes windows, starts and noise."""
    if len(ids) <= model.config.block_size:
        raise UsageError(f"{len(ids)} tokens are too few to evaluate on: "
                         f"need more than block_size={model.config.block_size}")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x, y = random_windows(ids, model.config.block_size, windows, g)
    x, y = x.to(device), y.to(device)
    ppl = lambda logits: math.exp(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).item())
    if not getattr(model, "thinks", False):
        flat = ppl(model.logits(x)[0])
        return {"steps": {k: flat for k in steps}, "candidates": {n: flat for n in candidates}}
    context, trained = model.context(x), model.trained_steps()
    traj = model.think_candidates(context, x.shape[1], 1, g, steps=max(*steps, trained))
    by_steps = {k: ppl(traj.ys[k][:, 0]) for k in steps}
    single = ppl(traj.ys[trained][:, 0])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the noise, seeded
        torch.manual_seed(seed)
        traj = model.think_candidates(context, x.shape[1], max(candidates), g)
    final = traj.energies[-1]  # (W, N, S)
    by_candidates = {n: single if n == 1 else ppl(keep_lowest(traj.ys[-1][:, :n], final[:, :n])) for n in candidates}
    return {"steps": by_steps, "candidates": by_candidates}


# -----------------------------------------------------------------------------
# 8. Images: the denoising EBT, and two baselines on the same transformer
#
# y is an image in [-1, 1]. The noise is the DDPM forward process of the paper's image runs;
# the EBT's energy model is a bidirectional transformer over patches of y, and thinking starts
# from the noisy image and descends the energy toward a clean one.

def alpha_bar(t):
    """The signal fraction of the DDPM forward process after t steps (0 = clean, 1000 = noise):
    the product over s = 1..t of (1 - beta_s), betas linear from 1e-4 to 0.02. t: int or tensor."""
    betas = torch.linspace(1e-4, 0.02, DDPM_STEPS, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), (1 - betas).cumprod(0)])[t]


def ddpm_noise(clean, t, noise):
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise; t an int or one per image (B,).
    At t = 99 (the paper's training level) the signal is scaled by 0.95 and the noise std is 0.32."""
    a = alpha_bar(torch.as_tensor(t)).to(clean.device, clean.dtype).reshape(-1, 1, 1, 1)
    return a.sqrt() * clean + (1 - a).sqrt() * noise


def patchify(img, p):
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), patches in row-major order."""
    B, C, H, W = img.shape
    x = img.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x, p, C):
    """(B, N, C*p*p) -> (B, C, H, W) for a square grid of N patches."""
    B, N, _ = x.shape
    n = math.isqrt(N)
    return x.reshape(B, n, n, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, n * p, n * p)


def psnr(pred, clean):
    """Peak signal-to-noise ratio in dB of each image in [-1, 1] (pred is clipped first): (B,)."""
    mse = (pred.clamp(-1, 1) - clean).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp(min=1e-10))


class PatchTransformer(nn.Module):
    """ViT-style body shared by the image models: linear patch embedding plus a learned
    position per patch, the shared blocks without a mask and modulated by a conditioning
    vector (adaLN-Zero), final RMSNorm."""

    def __init__(self, cfg):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patch_emb = nn.Linear(cfg.channels * cfg.patch_size ** 2, cfg.n_embd, bias=False)
        self.pos_emb = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2, cfg.n_embd)  # one per (row, col)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.n_embd)

    def forward(self, img, cond, double_backward=False):
        """img: (B, C, S, S); cond: (B, D). Returns (B, N, D)."""
        x = self.patch_emb(patchify(img, self.patch_size)) + self.pos_emb.weight
        for block in self.blocks:
            x = block.forward_bidirectional(x, cond, double_backward)
        return self.norm(x)


class ImageEBT(Thinker, nn.Module):
    """Energy of a candidate clean image: the mean over patch tokens of a scalar head, the
    blocks conditioned on the step embedding. Denoising = thinking from the noisy image,
    y <- y - alpha * dE/dy. Gates and head start at zero: untrained, it returns its input."""

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
        double_backward = self.differentiates_twice()
        return self.energy_head(self.body(img, cond, double_backward)).squeeze(-1).mean(1)

    def predict(self, noisy, steps=None, step_size=None):
        """Think from the noisy image (B, C, S, S). Returns a Trajectory of images and energies (B,)."""
        return self.descend(self.energy, noisy, steps, step_size)

    def forward(self, clean, noise, steps=None, generator=None, backward_scale=None):
        """Noise the clean images to step noise_t, think, and score every step by its smooth-L1
        distance to the clean image (see TextEBT.forward for backward_scale). generator is
        accepted for evaluate() and unused: the starting point is the noisy image."""
        noisy = ddpm_noise(clean, self.config.noise_t, noise)
        traj, loss, metrics = self.descend_and_learn(self.energy, noisy, clean, F.smooth_l1_loss, steps, backward_scale)
        metrics["psnr"] = psnr(traj.ys[-1].detach(), clean).mean()
        if not self.training:
            metrics["psnr_per_step"] = torch.stack([psnr(y, clean).mean() for y in traj.ys[1:]])
        return loss, metrics


def timestep_embedding(t, dim):
    """Sinusoidal embedding (B, dim) of DDPM steps t (B,)."""
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class ImageDiT(nn.Module):
    """The paper's image baseline, a Diffusion Transformer, here on the same blocks and size:
    conditioned on the DDPM step t through adaLN-Zero, it predicts the noise; trained on t in
    1..noise_t; denoises with DDIM."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.model == "image_dit"
        self.config = cfg
        self.body = PatchTransformer(cfg)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.n_embd, cfg.n_embd), nn.SiLU(), nn.Linear(cfg.n_embd, cfg.n_embd))
        self.out = nn.Linear(cfg.n_embd, cfg.channels * cfg.patch_size ** 2, bias=False)
        self.out.zero_init = True
        self.apply(init_weights)

    def predicted_noise(self, x, t):
        """x: (B, C, S, S) at DDPM steps t (B,). Returns the noise in x, (B, C, S, S)."""
        cond = self.time_mlp(timestep_embedding(t, self.config.n_embd))
        return unpatchify(self.out(self.body(x, cond)), self.config.patch_size, self.config.channels)

    def forward(self, clean, noise, backward_scale=None):
        t = torch.randint(1, self.config.noise_t + 1, (len(clean),), device=clean.device)
        loss = F.mse_loss(self.predicted_noise(ddpm_noise(clean, t, noise), t), noise)
        loss = backpropagated(loss, backward_scale)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def denoise(self, noisy, t, passes):
        """Deterministic DDIM from step t down to 0 in `passes` evaluations of the model."""
        times = torch.linspace(t, 0, passes + 1).round().long().tolist()
        x = noisy
        for now, later in zip(times, times[1:]):
            a_now, a_later = alpha_bar(now).item(), alpha_bar(later).item()
            noise = self.predicted_noise(x, torch.full((len(x),), now, device=x.device))
            clean = (x - (1 - a_now) ** 0.5 * noise) / a_now ** 0.5
            x = a_later ** 0.5 * clean + (1 - a_later) ** 0.5 * noise
        return x


class ImageRegressor(nn.Module):
    """The same transformer, same size, trained to output the clean image in one forward pass.
    With nothing to condition on, its conditioning vector is a zero buffer, so the blocks' shift,
    scale and gate are learned constants: the adaLN biases (the adaLN weights multiply zero and stay
    zero). The simplest, and at this size strong, baseline."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.model == "image_regressor"
        self.config = cfg
        self.body = PatchTransformer(cfg)
        self.register_buffer("cond", torch.zeros(cfg.n_embd))  # in the state_dict: older checkpoints load
        self.out = nn.Linear(cfg.n_embd, cfg.channels * cfg.patch_size ** 2, bias=False)
        self.out.zero_init = True  # predicts a correction to its input: it starts as the identity
        self.apply(init_weights)

    def denoise(self, noisy):
        patches = self.out(self.body(noisy, self.cond.expand(len(noisy), -1)))  # (B, N, C*p*p)
        return noisy + unpatchify(patches, self.config.patch_size, self.config.channels)

    def forward(self, clean, noise, backward_scale=None):
        pred = self.denoise(ddpm_noise(clean, self.config.noise_t, noise))
        loss = backpropagated(F.smooth_l1_loss(pred, clean), backward_scale)
        return loss, {"loss": loss.detach(), "psnr": psnr(pred.detach(), clean).mean()}

