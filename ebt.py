"""
nanoEBT: Energy-Based Transformers in one file.

An EBT is a transformer that scores a (context, candidate prediction) pair with
one scalar energy E(x, y), low when y fits x. It predicts by *thinking*:
start y at random and run a few steps of gradient descent on the energy,

    y_{k+1} = y_k - step_size * dE(x, y_k)/dy_k,

and it is trained end to end through those steps (second-order gradients), so
it learns a landscape whose descent lands on the right answer.

Reading order:
  1. configuration
  2. transformer blocks shared by every model (RMSNorm, rotary, SwiGLU)
  3. think(): the descent loop, one implementation for text and images
  4. the autoregressive text EBT, and the Transformer++ baseline
  5. text data and tokenizers
  6. the training loop, checkpoints and command-line helpers
  7. thinking at inference: KV-cached generation, self-verification, evaluation
  8. plots of thinking (each takes a model and a text, returns a Figure)
  9. images: the denoising EBT, its one-pass baseline, image data

Paper: "Energy-Based Transformers are Scalable Learners and Thinkers",
Gladstone et al., 2025 (arXiv 2507.02092).
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class UsageError(Exception):
    """A problem with the user's input: reported as one line, exit code 2."""


class ConfigError(UsageError, ValueError):
    """An impossible configuration value; the message names the field."""


# -----------------------------------------------------------------------------
# 1. Configuration

TEXT_KINDS = ("ebt", "transformer")
IMAGE_KINDS = ("image_ebt", "image_baseline")
MODEL_KINDS = TEXT_KINDS + IMAGE_KINDS
VERIFY_LANGEVIN_STD = 1.0  # inference noise for self-verification candidates (the paper's)
MAX_THINK_STEPS = 64  # in training: each step keeps a second-order graph


@dataclass
class ModelConfig:
    model: str = "ebt"            # one of MODEL_KINDS ("transformer" is the Transformer++ baseline)
    vocab_size: int = 65
    block_size: int = 256         # context length
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    mlp_hidden: int = 0           # SwiGLU hidden width; 0 = n_embd, the paper's sizes (xxs: 6 x 384, 6.18M)
    # thinking (EBT only); the defaults are the paper's S1 recipe (train_text.py --recipe s1)
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
    truncate: bool = False        # train the last step only: its gradient keeps the graph, the loss is its CE
    detach: bool = True           # cut the graph between steps (False: backprop the whole path)
    replay_size: int = 0          # replay buffer: keep the final logits of the last N training sequences
    replay_batch: float = 0.5     # ... and add this fraction of a batch of them, started where they ended
    # images (image_ebt, image_baseline): square crops cut into square patches
    channels: int = 3
    image_size: int = 32
    patch_size: int = 4

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
        check(self.mlp_hidden >= 0, "mlp_hidden", "must be >= 0 (0 = n_embd)")
        self.mlp_hidden = self.mlp_hidden or self.n_embd
        check(self.random_steps >= 0, "random_steps", "must be >= 0")
        check(self.think_steps + self.random_steps <= MAX_THINK_STEPS, "think_steps",
              f"think_steps + random_steps must be <= {MAX_THINK_STEPS} in training (inference may think longer)")
        check(self.landscapes <= self.think_steps + self.random_steps, "landscapes",
              "must be <= think_steps + random_steps (more would never be used)")
        for name in ("step_size", "step_size_lr_mult", "init_std", "langevin_std", "replay_batch"):
            check(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, "must be finite and >= 0")
        check(self.step_size > 0, "step_size", "must be > 0")
        check(math.isfinite(self.random_step_size) and self.random_step_size >= 1, "random_step_size",
              "must be >= 1 (1 = off)")
        check(self.replay_size >= 0, "replay_size", "must be >= 0 (0 = off)")

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"ModelConfig: unknown option(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


# -----------------------------------------------------------------------------
# 2. Transformer blocks (Llama style: RMSNorm, rotary positions, SwiGLU, no biases)

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

    def forward(self, x, start):
        """x: (B, H, T, Dh), token t sits at position start + t."""
        T = x.shape[-2]
        if start + T > self.cos.shape[0]:
            raise ValueError(f"position {start + T} exceeds the rotary table ({self.cos.shape[0]})")
        cos = self.cos[start:start + T].to(x.dtype)
        sin = self.sin[start:start + T].to(x.dtype)
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
        """Queries, keys, values, each (B, H, T, Dh); rotary=None: positions are already in x."""
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
        q, k, v = self.heads(x, rotary, T - P + 1)  # prediction p sits one past its context token
        visible = causal_mask(P, T, x.device)  # (P, T)
        if double_backward:
            # Explicit softmax attention: the fused kernels have no second derivative.
            q = q * q.shape[-1] ** -0.5  # scaled once, here, rather than both score tensors
            to_context = (q @ k_ctx.transpose(-2, -1)).masked_fill(~visible, float("-inf"))  # (B, H, P, T)
            to_self = (q * k).sum(-1, keepdim=True)                                             # (B, H, P, 1)
            att_context, att_self = torch.cat([to_context, to_self], dim=-1).softmax(dim=-1).split([T, 1], dim=-1)
            y = att_context @ v_ctx + att_self * v
        else:
            keys, values = torch.cat([k_ctx, k], dim=2), torch.cat([v_ctx, v], dim=2)
            only_self = torch.eye(P, dtype=torch.bool, device=x.device)
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

    def forward(self, x, rotary, past=None):
        a, kv = self.attn(self.attn_norm(x), rotary, past)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), kv

    def forward_predictions(self, x, rotary, context, double_backward):
        x = x + self.attn.attend_predictions(self.attn_norm(x), rotary, context, double_backward)
        return x + self.mlp(self.mlp_norm(x))

    def forward_bidirectional(self, x, double_backward):
        x = x + self.attn.attend_all(self.attn_norm(x), double_backward)
        return x + self.mlp(self.mlp_norm(x))


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
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


# -----------------------------------------------------------------------------
# 3. Thinking: gradient descent on the energy

@dataclass
class Trajectory:
    """What one round of thinking went through; everything needed for a plot.
    ys[k] is the state after k steps (ys[0] is the start), energies[k] the energy step k
    descended, of ys[k] on that step's landscape; the last entry (final_energy) scores the
    final state on the landscape of the last step taken, so it compares like with like."""
    ys: list
    energies: list
    steps_used: torch.Tensor = None  # per position, when stopping adaptively


def think(energy_fn, y, steps, step_size, *, normalize=None, landscapes=None, create_graph=False, detach=True,
          truncate=False, langevin_std=0.0, random_step_size=1.0, tolerance=None, final_energy=True, on_step=None):
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
    """
    normalize = normalize or (lambda t: t)
    landscape = lambda k: k if landscapes is None else min(k, landscapes - 1)
    ys, energies, active, steps_used = [y], [], None, None
    with torch.enable_grad():
        for k in range(steps):
            start = y
            if langevin_std > 0:
                y = y + langevin_std * torch.randn_like(y)
            x = normalize(y)
            if detach or not create_graph or not x.requires_grad:
                x = x.detach().requires_grad_()
            energy = energy_fn(x, landscape(k))
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
                factor = torch.empty(shape, device=x.device, dtype=x.dtype)
                factor.uniform_(1 / random_step_size, random_step_size)
            alpha = step_size * factor if random_step_size > 1 else step_size
            keep_graph = create_graph and (not truncate or k == steps - 1)
            (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=keep_graph)
            # without create_graph, y still depends on a learnable step size
            y = (x if create_graph else x.detach()) - alpha * grad
            if active is not None:  # a frozen position keeps its state
                y = torch.where(active.reshape(active.shape + (1,) * (y.dim() - active.dim())), y, start)
            if on_step is not None:
                y = on_step(k, y)
            energies.append(energy if keep_graph else energy.detach())
            ys.append(y)
    if final_energy:
        with torch.no_grad():
            energies.append(energy_fn(normalize(y.detach()), landscape(len(ys) - 2)))
    return Trajectory(ys, energies, steps_used)


class Thinker:
    """What every EBT (text or image) shares: a step size alpha, learned (optionally) with its
    own learning rate and no weight decay, and the config's thinking options passed to think().
    The model defines self.config, self.raw_step_size and self.normalize (None: the identity)."""
    thinks = True  # forward takes steps= and generator= (see evaluate)
    normalize = None

    def step_size(self):
        """alpha, kept >= 1e-3 in value; the gradient passes the clamp, so alpha can come back."""
        raw = self.raw_step_size
        return raw + (raw.clamp(min=1e-3) - raw).detach()

    def trained_steps(self):
        """The most steps training takes (S2: 2 or 3, so 3): what evaluation thinks by default."""
        return self.config.think_steps + self.config.random_steps

    def draw_steps(self, rng=random):
        """Training's step count: think_steps plus U{0..random_steps}, from a Python random.Random
        (nothing to read back from a device)."""
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
                     tolerance=tolerance, final_energy=not train, on_step=on_step)

    def descend_and_learn(self, energy_fn, y0, target, loss_fn, steps=None, backward_scale=None):
        """Think from y0 and score every step with loss_fn(y, target). The loss is the mean over
        steps (S1), or with truncate the last step's (S2). With backward_scale (training), each
        step's loss x backward_scale is backpropagated as soon as it is computed and its graph
        freed: with the graph cut between steps the per-step losses share only the parameters
        (and what energy_fn reads, see TextEBT.forward), so this is the same gradient with one
        step's second-order graph alive instead of all of them.
        Returns (trajectory, loss, per-step losses), the losses detached when backpropagated."""
        steps = steps or (self.draw_steps() if self.training else self.trained_steps())
        weights = [0.0] * (steps - 1) + [1.0] if self.config.truncate else [1.0 / steps] * steps
        early = backward_scale is not None and torch.is_grad_enabled()
        losses = []

        def learn(k, y):
            loss = loss_fn(y, target)
            losses.append(loss.detach() if early else loss)
            if early and weights[k]:
                (loss * (weights[k] * backward_scale)).backward()
                return y.detach()
            return y
        traj = self.descend(energy_fn, y0, steps, on_step=learn)
        loss = sum(w * l for w, l in zip(weights, losses) if w)
        return traj, loss, losses

    def param_groups(self, weight_decay):
        """AdamW groups: decay matrices, not gains; a learned step size has its own lr, no decay."""
        others = [p for n, p in self.named_parameters() if n != "raw_step_size"]
        groups = decay_groups(others, weight_decay)
        if self.raw_step_size.requires_grad:
            groups.append({"params": [self.raw_step_size], "weight_decay": 0.0,
                           "lr_mult": self.config.step_size_lr_mult})
        return groups


def decay_groups(params, weight_decay):
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr_mult": 1.0},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_mult": 1.0}]


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
        # second derivatives are needed only when training through the descent
        double_backward = self.training and torch.is_grad_enabled()
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

    def think_candidates(self, context, P, candidates=1, generator=None, *, steps=None, step_size=None,
                         langevin_std=None, tolerance=None):
        """Think from `candidates` random starts about each of the last P positions of a
        context, all sharing its (k, v): only the prediction tokens are run. langevin_std
        defaults to the paper's inference noise, 1, when there are several candidates (the
        softmax all but erases their different starts), else 0. Returns a Trajectory with ys
        (B, N, P, V), energies (B, N, P) and, when stopping adaptively, steps_used (B, N, P)."""
        k0 = context[0][0]
        B, N = k0.shape[0], candidates
        if langevin_std is None:
            langevin_std = VERIFY_LANGEVIN_STD if N > 1 else 0.0
        if N > 1:  # a view, not a copy: every candidate reads the same keys and values
            context = [tuple(t[:, None].expand(B, N, *t.shape[1:]).flatten(0, 1) for t in kv) for kv in context]
        y0 = self.initial_logits(B * N, P, k0.device, generator)
        traj = self.predict(None, steps, step_size, y0=y0, context=context, tolerance=tolerance,
                            langevin_std=langevin_std)
        per_candidate = lambda t: None if t is None else t.unflatten(0, (B, N))
        return Trajectory([per_candidate(y) for y in traj.ys], [per_candidate(e) for e in traj.energies],
                          per_candidate(traj.steps_used))

    def next_token(self, idx, cache, generator=None, candidates=1, **knobs):
        """One step of generation: extend the context cache with idx (B, T_new), then think about
        the token after it with one prediction token per candidate against the cached keys,
        keeping the candidate with the lowest final energy (self-verification).
        knobs: steps, step_size, langevin_std, tolerance (see think).
        Returns the kept logits (B, V), the cache and per-token diagnostics."""
        cache = self.context(idx, cache)
        traj = self.think_candidates(cache, 1, candidates, generator, **knobs)
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
        last one. In training with a replay buffer, half a batch of earlier sequences joins the
        batch, each starting from the logits its last descent ended at.
        backward_scale: backpropagate loss x backward_scale here, one thinking step at a time
        (see Thinker.descend_and_learn), and return the loss detached.
        Metrics are tensors: reading them synchronises with the device."""
        y0 = self.initial_logits(*idx.shape, idx.device, generator)
        fresh = len(idx)
        if self.training and self.replay is not None:
            idx, targets, y0 = self.replay.extend(idx, targets, y0, round(self.config.replay_batch * fresh))
        context = kv = self.context(idx)
        early = backward_scale is not None and torch.is_grad_enabled()
        if early:  # the steps' losses reach the context stream through these leaves; its backward runs once, last
            context = [tuple(t.detach().requires_grad_() for t in layer) for layer in kv]
        cross_entropy = lambda y, t: F.cross_entropy(y.flatten(0, 1), t.flatten())
        traj, loss, losses = self.descend_and_learn(lambda p, k: self.energy(p, context, k), y0, targets,
                                                    cross_entropy, steps, backward_scale)
        if early:
            leaves = [t for layer in context for t in layer]
            torch.autograd.backward([t for layer in kv for t in layer], [t.grad for t in leaves])
        if self.training and self.replay is not None:
            self.replay.add(idx[:fresh], targets[:fresh], traj.ys[-1][:fresh])
        metrics = {"loss": loss.detach(), "loss_first": losses[0].detach(), "loss_last": losses[-1].detach(),
                   "energy_first": traj.energies[0].detach().mean(), "energy_last": traj.energies[-1].detach().mean(),
                   "step_size": self.step_size().detach()}
        if not self.training:
            metrics["loss_per_step"] = torch.stack(losses).detach()
        return loss, metrics


class ReplayBuffer:
    """The paper's S2 replay buffer (model/replay_buffer.py, flag mcmc_replay_buffer): the final
    logits of the last `size` training sequences, replayed as starting points so that training
    sees longer descents than it pays for. It lives on the model, outside its state_dict (each
    process keeps its own); train() checkpoints it."""

    def __init__(self, size):
        self.size, self.idx, self.targets, self.logits = size, None, None, None

    def extend(self, idx, targets, y0, n):
        """The batch plus up to n stored sequences drawn at random (torch's global generator),
        which start from their stored logits instead of y0."""
        n = min(n, 0 if self.idx is None else len(self.idx))
        if n == 0:
            return idx, targets, y0
        pick = torch.randperm(len(self.idx))[:n].to(self.idx.device)
        return (torch.cat([idx, self.idx[pick]]), torch.cat([targets, self.targets[pick]]),
                torch.cat([y0, self.logits[pick].to(y0.dtype)]))

    def add(self, idx, targets, logits):
        new = (idx, targets, logits.detach())
        old = (self.idx, self.targets, self.logits)
        self.idx, self.targets, self.logits = (t if o is None else torch.cat([o, t])[-self.size:] for o, t in zip(old, new))

    def state(self):
        return {"idx": self.idx, "targets": self.targets, "logits": self.logits}

    def load(self, state, device):
        self.idx, self.targets, self.logits = (None if state[k] is None else state[k].to(device)
                                               for k in ("idx", "targets", "logits"))


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

    def param_groups(self, weight_decay):
        return decay_groups(self.parameters(), weight_decay)


def backpropagated(loss, backward_scale):
    """What models do with backward_scale: backpropagate loss x backward_scale, return it detached."""
    if backward_scale is None or not torch.is_grad_enabled():
        return loss
    (loss * backward_scale).backward()
    return loss.detach()


def build_model(cfg, seed=None):
    """seed: makes the initial weights repeatable (training seeds its own batches and noise)."""
    if seed is not None:
        torch.manual_seed(seed)
    kinds = {"ebt": TextEBT, "transformer": Transformer, "image_ebt": ImageEBT, "image_baseline": ImageBaseline}
    return kinds[cfg.model](cfg)


# -----------------------------------------------------------------------------
# 5. Text data and tokenizers

SHAKESPEARE = Path(__file__).resolve().parent / "data" / "tinyshakespeare.txt.gz"  # ships with nanoEBT
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CACHE_DIR = Path(os.environ.get("NANOEBT_CACHE", Path.home() / ".cache" / "nanoebt"))


def download(url, path, sha256=None, hint="pass a local copy with --data PATH"):
    """Fetch url into path once (atomically); later calls reuse the cached file.
    hint: what the user can do instead, appended to the error."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except OSError as e:
        raise UsageError(f"could not download {url} ({e}); {hint}") from None
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise UsageError(f"{url} downloaded with an unexpected checksum; {hint}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def read_text(path):
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"data file {path} is a directory; pass a text file with --data")
    if not path.is_file():
        raise UsageError(f"data file {path} does not exist; pass an existing text file with --data")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"data file {path} is not readable UTF-8 text ({e})") from None
    if not text:
        raise UsageError(f"data file {path} is empty; pass a text file with --data")
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
    name = "char"

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
    name = "gpt2"

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
    eval_steps: int = 0           # EBT: think this many steps at evaluation (0: 2x think_steps)
    log_interval: int = 10
    out_dir: str = "out"
    device: str = "auto"
    seed: int = 1337
    compile: bool = False         # torch.compile what needs no double backward (see compile_model)

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
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
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
    """torch.compile has no double backward, so an EBT compiles only its context stream
    (first-order backward); the Transformer++ compiles whole. Compiling bound methods keeps
    the parameter names, so checkpoints stay interchangeable."""
    target = model.trunk if getattr(model, "thinks", False) else model
    target.forward = torch.compile(target.forward)
    return model


def lr_at(step, tc):
    """Linear warm-up, then cosine decay to lr/10."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


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


def resume_checkpoint(out_dir, model_kind):
    """The checkpoint to resume in out_dir, checked to hold the same kind of model."""
    path = Path(out_dir) / "ckpt.pt"
    ckpt = load_checkpoint(path)
    if ckpt["model_config"].get("model") != model_kind:
        raise UsageError(f"checkpoint {path} holds a {ckpt['model_config'].get('model')!r} model, not "
                         f"{model_kind!r}; use the same --model or another --out_dir")
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
    their "loss" is the one after the trained number of steps."""
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
    if thinks:
        m["loss"] = m["loss_per_step"][min(model.trained_steps(), len(m["loss_per_step"])) - 1]
    return m


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def plot_metrics(records, path):
    """Loss curve PNG from the metrics log: the training loss smoothed (raw, faint), and the
    validation loss (an EBT's after 1, the trained and the most evaluated thinking steps)."""
    from matplotlib.figure import Figure  # no pyplot: nothing global to set up or close
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "eval"]
    if train:
        steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
        ax.plot(steps, losses, color="C0", alpha=0.25, lw=0.8)
        smooth, avg = [], losses[0]
        for l in losses:  # exponential moving average
            avg = 0.9 * avg + 0.1 * l
            smooth.append(avg)
        ax.plot(steps, smooth, color="C0", label="train loss (smoothed; raw faint)")
    if val and "loss_per_step" in val[0]:
        K = len(val[0]["loss_per_step"])
        for k in sorted({0, K // 2 - 1, K - 1}):
            ax.plot([r["step"] for r in val], [r["loss_per_step"][k] for r in val], marker="o",
                    label=f"val loss, {k + 1} thinking step{'s' if k else ''}")
    elif val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], marker="o", label="val loss")
    ax.set(xlabel="optimizer step", ylabel="loss (nats per token)", title=f"training: {Path(path).parent.name}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


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


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Schedulers stop jobs with SIGTERM: treat it like Ctrl-C, so the run is saved."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def prepare_out_dir(out, resume):
    """Never overwrite an earlier run; remove what a crash during a save left behind."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out_dir {out} is a file, not a directory; pass a directory")
    if not resume and ((out / "ckpt.pt").exists() or (out / "metrics.jsonl").exists()):
        raise UsageError(f"{out} already holds a run; continue it with --resume, or pass another --out_dir")
    for stale in out.glob("*.tmp") if out.is_dir() else ():
        stale.unlink()


def device_memory(device):
    """Bytes of memory on the device (CPU: physical memory)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(cfg, batch_size, tokens, device):
    """Refuse at once what cannot fit: the largest single tensor of a training step (activations
    B x T x D, logits B x T x V, or the EBT's explicit attention scores B x H x T x T) alone
    would outgrow the device. A lower bound: passing it does not promise a fit."""
    sizes = {"activations": batch_size * tokens * cfg.n_embd, "logits": batch_size * tokens * cfg.vocab_size}
    if cfg.model == "ebt":
        sizes["attention scores"] = batch_size * cfg.n_head * tokens * tokens
    what, largest = max(sizes.items(), key=lambda kv: kv[1])
    if 4 * largest > device_memory(device):
        raise UsageError(f"batch {batch_size} x {tokens} tokens cannot fit on {device}: its {what} alone take "
                         f"{4 * largest / 2**30:,.0f} GiB of {device_memory(device) / 2**30:,.0f}; "
                         "lower --batch_size (--grad_accum keeps the batch) or --block_size")


def is_out_of_memory(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "can't allocate memory" in str(e) or "out of memory" in str(e)


def average_gradients(model, world):
    """Data parallel: one all-reduce of all gradients, flattened, per optimizer step.
    (DistributedDataParallel's hooks expect one backward per forward; an EBT runs several.)"""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads]) / world
    torch.distributed.all_reduce(flat)
    for g, new in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(new.view_as(g))


def train(model, data, tc, meta=None, resume=False, log=None):
    """The training loop shared by the text and image drivers; runs as it is under
    torchrun (data parallel, one process per device).

    model(x, y, backward_scale=s) -> (loss, metrics dict of tensors), having backpropagated loss x s;
    model.param_groups(weight_decay) -> AdamW groups.
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
    optimizer = torch.optim.AdamW(model.param_groups(tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95),
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
                replay.load(kept if master else kept["replay"], device)
        if log_path.exists():
            records = [r for r in read_records(log_path) if r["step"] <= step]
        log(f"resumed from {ckpt_path} at step {step}")
    if world > 1:  # every rank starts from rank 0's weights
        for t in model.state_dict().values():
            torch.distributed.broadcast(t, 0)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def checkpoint():
        nonlocal saved
        if replay is not None and not master:
            save_checkpoint(replay_path, {"step": step, "replay": replay.state()})
        if master:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "model_config": asdict(model.config), "train_config": asdict(tc),
                "step": step,  # also the data position: batches are a function of (seed, step)
                **({"replay": replay.state()} if replay is not None else {}), **(meta or {})})
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
    t0, t_last, start_step = time.time(), time.time(), step
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # since the last check, on the device
    try:
        with sigterm_as_interrupt():
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
                if logging:
                    metrics = {k: v.item() for k, v in metrics.items()}
                    if world > 1:  # report the loss over the global batch
                        mean_loss = loss.detach().clone()
                        torch.distributed.all_reduce(mean_loss)
                        metrics["loss"] = mean_loss.item() / world
                if master and logging:
                    now = time.time()
                    tok_s = tokens_per_step * (step - max(start_step, step - tc.log_interval)) / max(now - t_last, 1e-9)
                    t_last = now
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
                        if "loss_per_step" in m:
                            line = (f"eval step {step} | val loss after 1..{len(m['loss_per_step'])} thinking steps: "
                                    + " ".join(f"{l:.4f}" for l in m["loss_per_step"]))
                            if "psnr_per_step" in m:
                                line += " | PSNR " + " ".join(f"{p:.2f}" for p in m["psnr_per_step"])
                            log(line)
                        else:
                            log(f"eval step {step} | val loss {m['loss']:.4f}")
                    checkpoint()
                    if master:
                        plot_metrics(records, out / "loss.png")
                    t_last = time.time()  # throughput counts training only
    except KeyboardInterrupt:
        if bool(nonfinite):
            log(f"interrupted at step {step}; not saved: the run had become non-finite")
        else:
            checkpoint()
            if master:
                plot_metrics(records, out / "loss.png")
            log(f"interrupted at step {step}; saved {ckpt_path} (continue with --resume)")
    except NonFiniteError as e:
        kept = (f"the last good checkpoint is {ckpt_path} (step {saved})" if saved is not None else
                f"no checkpoint was written yet (the first comes at step {tc.eval_interval})")
        raise UsageError(f"training stopped: {e}; {kept}; try a lower --lr or --step_size") from None
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        raise UsageError(f"out of memory on {device} with batch {tc.batch_size} x {data.tokens_per_sample}: "
                         "lower --batch_size (--grad_accum keeps the batch) or --block_size") from None
    finally:
        if world > 1:
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
    trajectory: list = None                # n tensors (B, K+1): the kept candidate's energy after each step


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
    if thinking and not getattr(model, "thinks", False):
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


def pydoc_topics_text():
    """The English documentation Python ships (pydoc_data.topics): out-of-distribution text
    for a model trained on Shakespeare, on every machine, no download."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def in_vocabulary(text, tokenizer):
    """The text without the characters a char tokenizer lacks (GPT-2 BPE covers everything),
    and how many were dropped."""
    if not isinstance(tokenizer, CharTokenizer):
        return text, 0
    kept = "".join(c for c in text if c in tokenizer.index)
    return kept, len(text) - len(kept)


def validation_and_ood(tokenizer, block_size, data_text, ood_text=None):
    """Token ids to evaluate thinking on: the validation split of the training text, and an
    out-of-distribution text (default: pydoc_data.topics) cut to the vocabulary.
    Returns (val ids, OOD ids, characters dropped from the OOD text)."""
    val = TextData(tokenizer.encode(data_text), block_size).split["val"]
    ood, dropped = in_vocabulary(pydoc_topics_text() if ood_text is None else ood_text, tokenizer)
    return val, torch.tensor(tokenizer.encode(ood)), dropped


@torch.no_grad()
def thinking_curves(model, ids, steps=(1, 2, 4, 8), candidates=(1, 2, 4, 8), windows=16, seed=0):
    """Perplexity on fixed windows of a 1-D token tensor, after each number of thinking steps
    (one candidate), and with each number of candidates (at the trained number of steps,
    keeping the lowest final energy; with several, each thinks with the paper's inference noise).
    One descent covers every step count, and the candidates for N are the first N of
    max(candidates). Flat for the Transformer. Repeatable: seed fixes windows, starts and noise."""
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
    context = model.context(x)
    traj = model.think_candidates(context, x.shape[1], 1, g, steps=max(steps))
    by_steps = {k: ppl(traj.ys[k][:, 0]) for k in steps}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the noise, seeded
        torch.manual_seed(seed)
        traj = model.think_candidates(context, x.shape[1], max(candidates), g,
                                      langevin_std=VERIFY_LANGEVIN_STD if max(candidates) > 1 else 0.0)
    final = traj.energies[-1]  # (W, N, S)
    by_candidates = {n: ppl(keep_lowest(traj.ys[-1][:, :n], final[:, :n])) for n in candidates}
    return {"steps": by_steps, "candidates": by_candidates}


def thinking_table(results, trained_steps):
    """results: {source name: thinking_curves(...)} -> a table to read at a glance."""
    names = list(results)
    width = max(12, *(len(n) for n in names))
    head = lambda first: f"{first:<26}" + "".join(f"{n:>{width + 2}}" for n in names)
    lines = ["perplexity (lower is better)", head("thinking steps (N=1)")]
    for k in next(iter(results.values()))["steps"]:
        mark = "  <- trained" if k == trained_steps else ""
        lines.append(f"{k:<26}" + "".join(f"{results[n]['steps'][k]:>{width + 2}.3f}" for n in names) + mark)
    lines.append(head(f"candidates ({trained_steps} steps)"))
    for c in next(iter(results.values()))["candidates"]:
        lines.append(f"{c:<26}" + "".join(f"{results[n]['candidates'][c]:>{width + 2}.3f}" for n in names))
    return "\n".join(lines)


def plot_thinking_curves(results, trained_steps, title="perplexity vs thinking"):
    """results: {label: thinking_curves(...)} -> a Figure: perplexity against steps and candidates."""
    fig = figure(figsize=(8, 3.4), layout="constrained")
    by_steps, by_candidates = fig.subplots(1, 2)
    for label, r in results.items():
        by_steps.plot(list(r["steps"]), list(r["steps"].values()), marker="o", label=label)
        by_candidates.plot(list(r["candidates"]), list(r["candidates"].values()), marker="o", label=label)
    by_steps.axvline(trained_steps, color="gray", ls=":", label="trained steps")
    by_steps.set(xlabel="thinking steps (1 candidate)", ylabel="perplexity")
    by_candidates.set(xlabel=f"candidates N ({trained_steps} steps, lowest energy kept)", xscale="log", ylabel="perplexity")
    counts = list(next(iter(results.values()))["candidates"])
    by_candidates.set_xticks(counts, [str(n) for n in counts])
    by_candidates.minorticks_off()
    for ax in (by_steps, by_candidates):
        ax.grid(alpha=0.3)
    by_steps.legend(fontsize=8)
    fig.suptitle(title)
    return fig


# -----------------------------------------------------------------------------
# 8. Plots of thinking: each takes a model (eval mode) and a text, returns (Figure, numbers)

@dataclass
class TextThinking:
    """An EBT thinking at every position of a text at once (teacher-forced)."""
    ids: torch.Tensor   # (T + 1,) the text's tokens; position i sees ids[:i+1] and predicts ids[i+1]
    labels: list        # T readable labels of the predicted tokens ids[1:]
    traj: Trajectory    # ys: K+1 tensors (1, T, V); energies: K+1 tensors (1, T)
    context: list       # per-layer (k, v) of ids[:-1], each (1, H, T, Dh)

    def energies(self):
        return torch.stack(self.traj.energies)[:, 0].T.float().cpu()  # (T, K+1)


def token_label(tokenizer, i):
    return tokenizer.decode([i]).replace("\n", "\\n").replace(" ", "␣")


@torch.no_grad()
def think_on_text(model, tokenizer, text, steps=None, seed=0):
    """Think about every next token of a text (its last block_size + 1 tokens) from fixed random
    starts, for `steps` steps (default 4x the trained number: where thinking longer goes)."""
    require_ebt(model, "plotting the energy")
    ids = torch.tensor(tokenizer.encode(text)[-(model.config.block_size + 1):])
    if len(ids) < 2:
        raise UsageError(f"the text {text!r} is too short to plot: it needs at least 2 tokens")
    device = next(model.parameters()).device
    context = model.context(ids[None, :-1].to(device))
    traj = model.think_candidates(context, len(ids) - 1, 1, torch.Generator().manual_seed(seed),
                                  steps=steps or 4 * model.trained_steps())
    traj = Trajectory([y[:, 0] for y in traj.ys], [e[:, 0] for e in traj.energies])
    return TextThinking(ids, [token_label(tokenizer, i) for i in ids[1:].tolist()], traj, context)


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


def step_axis_label(model):
    """Which landscape each plotted energy is on: step k's candidate is scored on step k's."""
    L = model.config.landscapes
    if L == 1:
        return "thinking step (one landscape)"
    return f"thinking step (each on its own landscape; steps >= {L - 1} share the last)"


def plot_energy_trajectories(model, energies, title, labels=None):
    """Energy (T, K+1) against thinking step, one faint line per token and their mean."""
    from matplotlib import colormaps
    fig = figure(figsize=(6, 3.4), layout="constrained")
    ax = fig.subplots()
    colors = colormaps["viridis"](torch.linspace(0, 1, len(energies)).numpy())
    for e, c in zip(energies, colors):
        ax.plot(e.numpy(), color=c, alpha=0.35, lw=1)
    ax.plot(energies.nanmean(0).numpy(), color="black", lw=2, label="mean over tokens")
    ax.set(xlabel=step_axis_label(model), ylabel="energy", title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def plot_energy_per_step(model, tokenizer, text, steps=None, seed=0):
    """Energy against thinking step, one line per token of the text. Returns (Figure, energies (T, K+1))."""
    energies = think_on_text(model, tokenizer, text, steps, seed).energies()
    title = f"energy while thinking, {len(energies)} tokens (colour = position)"
    return plot_energy_trajectories(model, energies, title), energies


def plot_generation(model, generation, row=0):
    """The energy trajectories of generated tokens: what generate() returned (one row of its
    batch). Positions that stopped early (adaptive stopping) end early. Returns (Figure,
    energies (n, K+1), NaN after a stop)."""
    require_ebt(model, "plotting a generation's energies")
    if not generation.trajectory:
        raise UsageError("the generation has no thinking trajectories (no new tokens, or not an EBT)")
    K = max(t.shape[-1] for t in generation.trajectory)
    energies = torch.full((len(generation.trajectory), K), float("nan"))
    for i, t in enumerate(generation.trajectory):
        energies[i, :t.shape[-1]] = t[row].float().cpu()
    title = f"energy while generating, {len(energies)} tokens (colour = position)"
    return plot_energy_trajectories(model, energies, title), energies


def plot_energy_heatmap(model, tokenizer, text, steps=None, seed=0):
    """Per-token energy over thinking steps, tokens labelled: hard tokens stay high.
    Returns (Figure, energies (T, K+1))."""
    thought = think_on_text(model, tokenizer, text, steps, seed)
    energies = thought.energies()
    fig = figure(figsize=(max(5, 0.16 * len(energies) + 1.5), 2.6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(energies.T.numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xticks(range(len(thought.labels)), thought.labels, fontsize=7, family="monospace")
    ax.set(xlabel="predicted token", ylabel="thinking step", title="energy per token and step (bright = high = unsure)")
    fig.colorbar(image, ax=ax, label="energy")
    return fig, energies


def plot_energy_landscape(model, tokenizer, text, position=-1, steps=None, seed=0, grid=31):
    """The energy around one token's prediction on the plane through the start, middle and
    end of its descent path, with the path drawn (points off the plane are projected).
    Energies are on the landscape of the path's last step. Returns (Figure, energies (grid, grid))."""
    thought = think_on_text(model, tokenizer, text, steps, seed)
    path = torch.stack([y[0, position] for y in thought.traj.ys])  # (K+1, V)
    origin, middle, end = path[0], path[len(path) // 2], path[-1]
    u = (end - origin) / (end - origin).norm().clamp(min=1e-12)
    v = middle - origin - (middle - origin) @ u * u
    if v.norm() < 1e-6 * (end - origin).norm():  # a straight path spans no plane: take a random direction
        r = torch.randn(path.shape[-1], generator=torch.Generator().manual_seed(seed)).to(path)
        v = r - r @ u * u
    v = v / v.norm()
    path_xy = torch.stack([(path - origin) @ u, (path - origin) @ v], -1).cpu()  # (K+1, 2)
    lo, hi = path_xy.min(0).values, path_xy.max(0).values
    pad = 0.3 * (hi - lo).max().clamp(min=1e-3)
    a, b = (torch.linspace(lo[i] - pad, hi[i] + pad, grid) for i in (0, 1))
    A, Bv = torch.meshgrid(a, b, indexing="xy")  # (grid, grid): rows follow b, columns a
    points = origin + A.reshape(-1, 1).to(path) * u + Bv.reshape(-1, 1).to(path) * v  # (grid^2, V)
    T = len(thought.labels)
    p = position % T
    context = [(k[..., :p + 1, :], w[..., :p + 1, :]) for k, w in thought.context]  # what position p sees
    with torch.no_grad():
        energies = torch.cat([
            model.energy(chunk[:, None].softmax(-1), [(k.expand(len(chunk), -1, -1, -1), w.expand(len(chunk), -1, -1, -1))
                                          for k, w in context], min(len(path) - 2, model.config.landscapes - 1))[:, 0]
            for chunk in points.split(64)]).reshape(grid, grid).float().cpu()
    fig = figure(figsize=(5, 4), layout="constrained")
    ax = fig.subplots()
    filled = ax.contourf(a.numpy(), b.numpy(), energies.numpy(), levels=20, cmap="viridis")
    fig.colorbar(filled, ax=ax, label="energy")
    ax.plot(path_xy[:, 0].numpy(), path_xy[:, 1].numpy(), "w.-", lw=1.5, ms=8, label="descent path")
    ax.plot(*path_xy[0].numpy(), "wo", ms=9, mfc="none", label="start")
    ax.plot(*path_xy[-1].numpy(), "r*", ms=12, label="end")
    ax.set(xlabel="direction start -> end", ylabel="direction to the middle",
           title=f"energy landscape predicting {thought.labels[p]!r} (position {p})")
    ax.legend(fontsize=8, loc="best")
    return fig, energies


def plot_distribution_sharpening(model, tokenizer, text, position=-1, steps=None, seed=0, top=4):
    """The predicted distribution at one position after each thinking step: the tokens that
    are in the top `top` at any step. Returns (Figure, probabilities (K+1, V))."""
    thought = think_on_text(model, tokenizer, text, steps, seed)
    probs = torch.stack([y[0, position] for y in thought.traj.ys]).float().softmax(-1).cpu()  # (K+1, V)
    shown = list(dict.fromkeys(probs.topk(min(top, probs.shape[-1]), -1).indices.flatten().tolist()))
    shown.sort(key=lambda i: -probs[-1, i])
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)
    target = thought.ids[1:][position].item()
    labels = [token_label(tokenizer, i) + (" (true)" if i == target else "") for i in shown]
    fig = figure(figsize=(5, 0.3 * len(shown) + 1.6), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(probs[:, shown].T.numpy(), aspect="auto", cmap="Blues", vmin=0, interpolation="nearest")
    for k in range(len(probs)):
        for r, i in enumerate(shown):
            ax.text(k, r, f"{probs[k, i]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if probs[k, i] > 0.6 * probs[:, shown].max() else "black")
    ax.set_yticks(range(len(shown)), labels, family="monospace")
    ax.set_xticks(range(len(probs)), [f"{k}\nH={h:.2f}" for k, h in enumerate(entropy.tolist())], fontsize=7)
    ax.set(xlabel="thinking step (H = entropy, nats)",
           title=f"distribution sharpening at position {position % len(thought.labels)}")
    fig.colorbar(image, ax=ax, label="probability")
    return fig, probs


# -----------------------------------------------------------------------------
# 9. Images: the denoising EBT
#
# y is an image. The energy model is a bidirectional transformer over patches of y;
# thinking starts from the noisy image and descends the energy toward a clean one.

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
    """Peak signal-to-noise ratio in dB of each image in [0, 1] (pred is clipped first): (B,)."""
    mse = (pred.clamp(0, 1) - clean).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp(min=1e-10))


class PatchTransformer(nn.Module):
    """ViT-style body shared by the image EBT and its baseline: linear patch embedding plus a
    learned position per patch, the shared blocks without causal masking, final RMSNorm."""

    def __init__(self, cfg):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patch_emb = nn.Linear(cfg.channels * cfg.patch_size ** 2, cfg.n_embd, bias=False)
        self.pos_emb = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2, cfg.n_embd)  # one per (row, col)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.n_embd)

    def forward(self, img, cond=0.0, double_backward=False):
        """img: (B, C, S, S); cond: a (D,) vector added to every token. Returns (B, N, D)."""
        x = self.patch_emb(patchify(img, self.patch_size)) + self.pos_emb.weight + cond
        for block in self.blocks:
            x = block.forward_bidirectional(x, double_backward)
        return self.norm(x)


class ImageEBT(Thinker, nn.Module):
    """Energy of a candidate clean image: the mean over patch tokens of a scalar head.
    Denoising = thinking from the noisy image, y <- y - alpha * dE/dy."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.model == "image_ebt"
        self.config = cfg
        self.body = PatchTransformer(cfg)
        self.step_emb = nn.Embedding(cfg.landscapes, cfg.n_embd)
        self.energy_head = nn.Linear(cfg.n_embd, 1, bias=False)
        self.apply(init_weights)
        self.raw_step_size = nn.Parameter(torch.tensor(float(cfg.step_size)), requires_grad=cfg.learn_step_size)

    def energy(self, img, landscape):
        """img: (B, C, S, S) candidates. Returns energies (B,)."""
        cond = self.step_emb.weight[landscape]
        # second derivatives are needed only when training through the descent
        double_backward = self.training and torch.is_grad_enabled()
        return self.energy_head(self.body(img, cond, double_backward)).squeeze(-1).mean(1)

    def predict(self, noisy, steps=None, step_size=None):
        """Think from the noisy image (B, C, S, S). Returns a Trajectory of images and energies (B,)."""
        return self.descend(self.energy, noisy, steps, step_size)

    def forward(self, noisy, clean, steps=None, generator=None, backward_scale=None):
        """Loss = mean over thinking steps of the smooth-L1 distance to the clean image (see
        TextEBT.forward for backward_scale). generator is accepted for evaluate() and unused:
        the starting point is not random."""
        traj, loss, losses = self.descend_and_learn(self.energy, noisy, clean, F.smooth_l1_loss, steps, backward_scale)
        metrics = {"loss": loss.detach(), "loss_first": losses[0].detach(), "loss_last": losses[-1].detach(),
                   "psnr": psnr(traj.ys[-1].detach(), clean).mean(),
                   "energy_first": traj.energies[0].detach().mean(), "energy_last": traj.energies[-1].detach().mean(),
                   "step_size": self.step_size().detach()}
        if not self.training:
            metrics["loss_per_step"] = torch.stack(losses).detach()
            metrics["psnr_per_step"] = torch.stack([psnr(y, clean).mean() for y in traj.ys[1:]])
        return loss, metrics


class ImageBaseline(nn.Module):
    """The same transformer, same size, trained to output the clean image in one forward pass."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.model == "image_baseline"
        self.config = cfg
        self.body = PatchTransformer(cfg)
        self.out = nn.Linear(cfg.n_embd, cfg.channels * cfg.patch_size ** 2, bias=False)
        self.apply(init_weights)

    def denoise(self, noisy):
        # predicts a correction to the noisy image: like the EBT, it starts from the input
        patches = self.out(self.body(noisy))  # (B, N, C*p*p)
        return noisy + unpatchify(patches, self.config.patch_size, self.config.channels)

    def forward(self, noisy, clean, backward_scale=None):
        pred = self.denoise(noisy)
        loss = backpropagated(F.smooth_l1_loss(pred, clean), backward_scale)
        return loss, {"loss": loss.detach(), "psnr": psnr(pred.detach(), clean).mean()}

    def param_groups(self, weight_decay):
        return decay_groups(self.parameters(), weight_decay)


# Image data: images are (C, H, W) tensors, float in [0, 1] or uint8 (the downloaded datasets,
# four times smaller in memory).

def check_noise_std(std):
    if not (math.isfinite(std) and 0 <= std <= 10):
        raise UsageError(f"noise level {std} is not a standard deviation between 0 and 10 (pixels are in [0, 1])")
    return std


class ImageData:
    """Random square crops with Gaussian noise: batch -> (noisy, clean), each (B, C, S, S)."""

    def __init__(self, train, val, crop, noise_std, source="images"):
        """train, val: sequences of (C, H, W) images (a list, or one (N, C, H, W) tensor)."""
        for split, images in (("train", train), ("val", val)):
            if len(images) == 0:
                raise UsageError(f"{source}: no {split} images")
            if min(min(img.shape[-2:]) for img in images) < crop:
                raise UsageError(f"{source}: some {split} images are smaller than the {crop}x{crop} crop; "
                                 "use a smaller --image_size")
        self.split = {"train": train, "val": val}
        self.crop, self.channels = crop, train[0].shape[0]
        self.noise_std = check_noise_std(noise_std)
        self.tokens_per_sample = crop * crop  # pixels count as tokens in the throughput log

    def batch(self, split, batch_size, generator):
        images, S, g = self.split[split], self.crop, generator
        crops = []
        for i in torch.randint(len(images), (batch_size,), generator=g).tolist():
            H, W = images[i].shape[-2:]
            top, left = (int(torch.randint(n - S + 1, (), generator=g)) for n in (H, W))
            crops.append(images[i][:, top:top + S, left:left + S])
        clean = torch.stack(crops)
        clean = clean.float() / 255 if clean.dtype == torch.uint8 else clean
        return clean + self.noise_std * torch.randn(clean.shape, generator=g), clean


def read_image(path):
    """A PNG or JPEG file as a (3, H, W) float tensor in [0, 1] (gray is repeated, alpha dropped)."""
    import matplotlib.image
    try:
        a = matplotlib.image.imread(path)
    except Exception as e:
        raise UsageError(f"{path} is not a readable PNG or JPEG image ({type(e).__name__})") from None
    a = torch.from_numpy(a.copy())
    a = a.float() if a.is_floating_point() else a.float() / 255  # PNG reads as float, JPEG as uint8
    a = a[..., None] if a.dim() == 2 else a                       # (H, W, channels)
    a = a[..., :1].expand(-1, -1, 3) if a.shape[-1] <= 2 else a[..., :3]  # gray to RGB, drop alpha
    return a.permute(2, 0, 1).contiguous()


def image_folder(path):
    """Every PNG or JPEG file in a folder, as (name, (3, H, W) image) pairs."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"image folder {path} does not exist")
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise UsageError(f"image folder {path} has no PNG or JPEG files")
    return [(f.name, read_image(f)) for f in files]


def sample_photos():
    """The photograph matplotlib ships (its other sample images are graphics, not photos)."""
    import matplotlib.cbook
    return [("grace_hopper.jpg", read_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg")))]


def held_out_strips(named_images, crop):
    """Hold out the bottom fifth (at least one crop high) of every image for validation.
    Returns lists of train and val images."""
    train, val = [], []
    for name, img in named_images:
        H, W = img.shape[-2:]
        n_val = max(crop, H // 5)
        if H - n_val < crop or W < crop:
            raise UsageError(f"{name} is {H}x{W} pixels: too small for {crop}x{crop} crops plus a held-out "
                             f"strip (needs at least {2 * crop} rows and {crop} columns); use a smaller --image_size")
        train.append(img[:, :H - n_val])
        val.append(img[:, H - n_val:])
    return train, val


MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def read_idx(path):
    """A gzipped IDX file (the MNIST format): big-endian magic (0, 0, dtype code, ndim),
    ndim big-endian int32 sizes, then the raw uint8 array."""
    import gzip
    import numpy as np
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise UsageError(f"{path} is not a gzipped uint8 IDX file")
    ndim = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_cifar10(path):
    """CIFAR-10's python tarball: five pickled training batches and one test batch, each a
    dict whose b"data" is (10000, 3072) uint8, channel-major 32x32 images.
    Returns (train, test) uint8 arrays (N, 3, 32, 32)."""
    import pickle
    import tarfile
    import numpy as np
    train, test = [], []
    with tarfile.open(path, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = Path(member.name).name
            if name.startswith("data_batch_") or name == "test_batch":
                batch = pickle.load(tar.extractfile(member), encoding="bytes")
                (test if name == "test_batch" else train).append(np.asarray(batch[b"data"], dtype=np.uint8))
    if not train or not test:
        raise UsageError(f"{path} is not the CIFAR-10 python tarball (no data_batch_* / test_batch)")
    return tuple(np.concatenate(parts).reshape(-1, 3, 32, 32) for parts in (train, test))


def download_dataset(name):
    """MNIST or CIFAR-10 as (train, val) uint8 tensors (N, C, H, W), downloaded once and cached."""
    hint = lambda p: f"no network? put the file at {p}, or use the default photos or --data DIR"
    if name == "mnist":
        split = []
        for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
            path = download(MNIST_URL + f, CACHE_DIR / "mnist" / f, hint=hint(CACHE_DIR / "mnist" / f))
            split.append(torch.from_numpy(read_idx(path).copy())[:, None])  # (N, 1, 28, 28)
        return tuple(split)
    path = CACHE_DIR / "cifar-10-python.tar.gz"
    train, test = read_cifar10(download(CIFAR10_URL, path, hint=hint(path)))
    return torch.from_numpy(train), torch.from_numpy(test)
