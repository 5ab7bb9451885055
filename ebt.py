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

Paper: "Energy-Based Transformers are Scalable Learners and Thinkers",
Gladstone et al., 2025 (arXiv 2507.02092).
"""

import contextlib
import hashlib
import json
import math
import os
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

MODEL_KINDS = ("ebt", "transformer")


@dataclass
class ModelConfig:
    model: str = "ebt"            # "ebt" or "transformer" (the Transformer++ baseline)
    vocab_size: int = 65
    block_size: int = 256         # context length
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    # thinking (EBT only)
    think_steps: int = 2          # descent steps during training
    step_size: float = 500.0      # initial value of the learnable step size alpha
    step_size_lr_mult: float = 1500.0  # alpha's lr = base lr x this (about 3x its initial value)
    init_std: float = 1.0         # std of the random starting logits
    random_init_std: bool = False  # training: each sequence's start std drawn from U[0, init_std]
    # "System 2" training options from the paper, all off by default
    langevin_std: float = 0.0     # std of Gaussian noise added to y before each step
    random_step_size: float = 1.0  # s > 1: per-sample alpha drawn from [alpha/s, alpha*s]
    random_steps: int = 0         # train with think_steps + U{0..random_steps} steps
    truncate: bool = False        # only the last step keeps the second-order graph
    detach: bool = True           # cut the graph between steps (False: backprop the whole path)

    def __post_init__(self):
        def check(ok, name, why):
            if not ok:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r}: {why}")
        check(self.model in MODEL_KINDS, "model", f"must be one of {MODEL_KINDS}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(self.n_embd % self.n_head == 0, "n_embd", f"must be divisible by n_head={self.n_head}")
        check((self.n_embd // self.n_head) % 2 == 0, "n_embd", "head size n_embd/n_head must be even for rotary")
        check(self.think_steps >= 1, "think_steps", "must be >= 1")
        check(self.step_size > 0, "step_size", "must be > 0")
        check(self.step_size_lr_mult > 0, "step_size_lr_mult", "must be > 0")
        check(self.init_std >= 0, "init_std", "must be >= 0")
        check(self.langevin_std >= 0, "langevin_std", "must be >= 0")
        check(self.random_step_size >= 1, "random_step_size", "must be >= 1 (1 = off)")
        check(self.random_steps >= 0, "random_steps", "must be >= 0")

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
    """Rotary position embedding: rotates pairs of channels by position-dependent angles."""

    def __init__(self, head_dim, max_positions, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(max_positions).float(), inv_freq)  # (P, Dh/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x, start):
        """x: (B, H, T, Dh), token t sits at position start + t."""
        T = x.shape[-2]
        if start + T > self.cos.shape[0]:
            raise ValueError(f"position {start + T} exceeds the rotary table ({self.cos.shape[0]})")
        cos = self.cos[start:start + T].to(x.dtype)
        sin = self.sin[start:start + T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def causal_mask(q_len, k_len, device):
    """(q_len, k_len) boolean mask, bottom-right aligned: query i sees keys 0..k_len-q_len+i."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def heads(self, x, rotary, start):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)
        return rotary(q, start), rotary(k, start), v  # each (B, H, T, Dh)

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
            scale = q.shape[-1] ** -0.5
            to_context = (q @ k_ctx.transpose(-2, -1)) * scale  # (B, H, P, T)
            to_context = to_context.masked_fill(~visible, float("-inf"))
            to_self = (q * k).sum(-1, keepdim=True) * scale     # (B, H, P, 1)
            att = torch.cat([to_context, to_self], dim=-1).softmax(dim=-1)
            y = att[..., :T] @ v_ctx + att[..., T:] * v
        else:
            keys, values = torch.cat([k_ctx, k], dim=2), torch.cat([v_ctx, v], dim=2)
            only_self = torch.eye(P, dtype=torch.bool, device=x.device)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=torch.cat([visible, only_self], dim=1))
        return self.merge(y)


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, cfg):
        super().__init__()
        hidden = 4 * cfg.n_embd * 2 // 3  # keeps the parameter count of a 4x GELU MLP
        self.gate_up = nn.Linear(cfg.n_embd, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, cfg.n_embd, bias=False)

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
    ys[k] is the prediction after k steps (ys[0] is the start), energies[k] its energy."""
    ys: list
    energies: list  # without final_energy, one shorter: the last prediction is not scored
    steps_used: torch.Tensor = None  # per position, when stopping adaptively


def think(energy_fn, y, steps, step_size, *, create_graph=False, detach=True, truncate=False,
          langevin_std=0.0, random_step_size=1.0, tolerance=None, final_energy=True):
    """Minimise energy_fn(y, step) -> (B, ...) energies by gradient descent on y.

    create_graph: keep the graph of each gradient so a loss on the ys trains the
        energy model through the descent (training); off for inference.
    detach: start each step from a detached y, so each step is its own graph.
    truncate: only the last step keeps create_graph.
    langevin_std: Gaussian noise added to y before each step.
    random_step_size: s > 1 draws each sample's step size from [alpha/s, alpha*s].
    tolerance: stop a position once its energy falls by less than this (inference).
    final_energy: also score the final prediction (one more forward; training skips it).
    """
    shape = (y.shape[0],) + (1,) * (y.dim() - 1)  # broadcasts per sample
    if random_step_size > 1:
        log_s = math.log(random_step_size)
        step_size = step_size * torch.empty(shape, device=y.device).uniform_(-log_s, log_s).exp()
    ys, energies = [y], []
    active = None
    steps_used = None
    with torch.enable_grad():
        for k in range(steps):
            if langevin_std > 0:
                y = y + langevin_std * torch.randn_like(y)
            if detach or not create_graph or not y.requires_grad:
                y = y.detach().requires_grad_()
            energy = energy_fn(y, k)
            keep_graph = create_graph and (not truncate or k == steps - 1)
            (grad,) = torch.autograd.grad(energy.sum(), y, create_graph=keep_graph)
            if tolerance is not None:
                if active is None:
                    active = torch.ones_like(energy, dtype=torch.bool)
                    steps_used = torch.zeros_like(energy, dtype=torch.long)
                else:  # freeze positions whose energy stopped falling
                    active = active & (energies[-1] - energy.detach() > tolerance)
                steps_used = steps_used + active.long()
                grad = grad * active.reshape(active.shape + (1,) * (grad.dim() - active.dim()))
            y = y - step_size * grad
            energies.append(energy if keep_graph else energy.detach())
            ys.append(y)  # without create_graph, y still depends on a learnable step size
    if final_energy:
        with torch.no_grad():
            energies.append(energy_fn(y.detach(), steps))
    return Trajectory(ys, energies, steps_used)


# -----------------------------------------------------------------------------
# 4a. The autoregressive text EBT

class TextEBT(nn.Module):
    thinks = True  # forward takes steps= and generator= (see evaluate)
    """Scores, for every position i, a candidate distribution over the next token.

    Two streams share one set of blocks: the context tokens (ordinary causal
    attention) and one prediction token per position, embedded from
    softmax(logits). The context never looks at predictions, so its keys and values
    are computed once and reused at every thinking step.
    """

    def __init__(self, cfg):
        super().__init__()
        assert cfg.model == "ebt"
        self.config = cfg
        self.trunk = Trunk(cfg)
        self.pred_emb = nn.Linear(cfg.vocab_size, cfg.n_embd, bias=False)  # probs -> embedding
        self.step_emb = nn.Embedding(cfg.think_steps + cfg.random_steps, cfg.n_embd)
        self.norm = RMSNorm(cfg.n_embd)
        self.energy_head = nn.Linear(cfg.n_embd, 1, bias=False)
        self.apply(init_weights)
        self.raw_step_size = nn.Parameter(torch.tensor(float(cfg.step_size)))

    def step_size(self):
        return self.raw_step_size.clamp(min=1e-3)  # stays positive whatever the optimizer does

    def context(self, idx, cache=None):
        """Per-layer (k, v) of the context stream, each (B, H, T, Dh)."""
        return self.trunk(idx, cache)[1]

    def energy(self, logits, context, step):
        """logits: (B, P, V) candidates for the next token after each of the last P
        context tokens. Returns energies (B, P)."""
        x = self.pred_emb(logits.softmax(-1))
        x = x + self.step_emb.weight[min(step, self.step_emb.num_embeddings - 1)]
        # second derivatives are needed only when training through the descent
        double_backward = self.training and torch.is_grad_enabled()
        for block, kv in zip(self.trunk.blocks, context):
            x = block.forward_predictions(x, self.trunk.rotary, kv, double_backward)
        return self.energy_head(self.norm(x)).squeeze(-1)

    def initial_logits(self, B, P, device, generator=None):
        """Random starting logits (B, P, V); a generator (on the CPU) makes them repeatable."""
        shape, dtype = (B, P, self.config.vocab_size), self.pred_emb.weight.dtype
        if generator is None:
            return self.config.init_std * torch.randn(shape, device=device, dtype=dtype)
        return self.config.init_std * torch.randn(shape, generator=generator, dtype=dtype).to(device)

    def predict(self, idx, steps=None, step_size=None, y0=None, context=None, tolerance=None, langevin_std=0.0):
        """Think from random logits at every position of idx: (B, T). Returns a Trajectory
        whose ys are (B, T, V) logits and energies (B, T)."""
        cfg = self.config
        context = self.context(idx) if context is None else context
        y0 = self.initial_logits(*idx.shape, idx.device) if y0 is None else y0
        train = self.training
        if steps is None:
            steps = cfg.think_steps
            if train and cfg.random_steps:
                steps += int(torch.randint(cfg.random_steps + 1, ()))
        if step_size is None:
            step_size = self.step_size() if train else self.step_size().detach()
        return think(lambda y, k: self.energy(y, context, k), y0, steps, step_size,
                     create_graph=train, detach=cfg.detach, truncate=cfg.truncate,
                     langevin_std=cfg.langevin_std if train else langevin_std,
                     random_step_size=cfg.random_step_size if train else 1.0,
                     tolerance=tolerance, final_energy=not train)

    def forward(self, idx, targets, steps=None, generator=None):
        """Loss = mean over thinking steps of the cross-entropy after each step."""
        y0 = self.initial_logits(*idx.shape, idx.device, generator)
        if self.training and self.config.random_init_std:
            y0 = y0 * torch.rand(idx.shape[0], 1, 1, device=idx.device)
        traj = self.predict(idx, steps, y0=y0)
        losses = torch.stack([F.cross_entropy(y.flatten(0, 1), targets.flatten()) for y in traj.ys[1:]])
        loss = losses.mean()
        metrics = {"loss": loss.item(), "loss_first": losses[0].item(), "loss_last": losses[-1].item(),
                   "ppl": math.exp(min(losses[-1].item(), 50.0)),
                   "energy_start": traj.energies[0].mean().item(), "energy_end": traj.energies[-1].mean().item(),
                   "step_size": self.step_size().item()}
        if not self.training:
            metrics["loss_per_step"] = [l.item() for l in losses]
        return loss, metrics

    def param_groups(self, weight_decay):
        """AdamW groups: decay matrices, not gains; the step size has its own lr, no decay."""
        others = [p for n, p in self.named_parameters() if n != "raw_step_size"]
        return decay_groups(others, weight_decay) + [
            {"params": [self.raw_step_size], "weight_decay": 0.0, "lr_mult": self.config.step_size_lr_mult}]


def decay_groups(params, weight_decay):
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "lr_mult": 1.0},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_mult": 1.0}]


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

    def forward(self, idx, targets):
        logits, _ = self.logits(idx)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return loss, {"loss": loss.item(), "ppl": math.exp(min(loss.item(), 50.0))}

    def param_groups(self, weight_decay):
        return decay_groups(self.parameters(), weight_decay)


def build_model(cfg):
    return {"ebt": TextEBT, "transformer": Transformer}[cfg.model](cfg)


# -----------------------------------------------------------------------------
# 5. Text data and tokenizers

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CACHE_DIR = Path(os.environ.get("NANOEBT_CACHE", Path.home() / ".cache" / "nanoebt"))


def download(url, path, sha256=None):
    """Fetch url into path once (atomically); later calls reuse the cached file."""
    path = Path(path)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except OSError as e:
        raise UsageError(f"could not download {url} ({e}); pass a local copy with --data PATH") from None
    if sha256 and hashlib.sha256(data).hexdigest() != sha256:
        raise UsageError(f"{url} downloaded with an unexpected checksum; pass a local copy with --data PATH")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def read_text(path):
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"data file {path} does not exist; pass an existing text file with --data")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"data file {path} is not readable UTF-8 text ({e})") from None
    if not text:
        raise UsageError(f"data file {path} is empty; pass a text file with --data")
    return text


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
        data = self.split[split]
        start = torch.randint(len(data) - self.block_size, (batch_size,), generator=generator)
        offsets = start[:, None] + torch.arange(self.block_size + 1)
        chunk = data[offsets]
        return chunk[:, :-1], chunk[:, 1:]  # inputs, next-token targets


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


def model_from_checkpoint(ckpt, device="cpu"):
    model = build_model(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device)


@torch.no_grad()
def evaluate(model, data, tc, device):
    """Mean validation metrics over fixed batches and fixed starting noise, so evaluations
    at different times are comparable. Models that think (model.thinks) are given the
    number of evaluation steps and the generator for their starting point."""
    model.eval()
    g = torch.Generator().manual_seed(tc.seed + 1)
    thinking = {}
    if getattr(model, "thinks", False):
        thinking = {"steps": tc.eval_steps or 2 * model.config.think_steps, "generator": g}
    totals = {}
    for _ in range(tc.eval_batches):
        x, y = data.batch("val", tc.batch_size, generator=g)
        with autocast(device):
            _, m = model(x.to(device), y.to(device), **thinking)
        for k, v in m.items():
            totals[k] = totals.get(k, 0) + torch.tensor(v, dtype=torch.float64)
    model.train()
    return {k: (v / tc.eval_batches).tolist() for k, v in totals.items()}


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def plot_metrics(records, path):
    """Loss curve PNG from the metrics log records."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "eval"]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", alpha=0.6)
    if val:
        if "loss_per_step" in val[0]:
            K = len(val[0]["loss_per_step"])
            for k in sorted({0, K // 2 - 1, K - 1}):
                ax.plot([r["step"] for r in val], [r["loss_per_step"][k] for r in val], marker="o",
                        label=f"val loss, {k + 1} thinking step{'s' if k else ''}")
        else:
            ax.plot([r["step"] for r in val], [r["loss"] for r in val], marker="o", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


def train(model, data, tc, meta=None, resume=False, log=print):
    """The training loop shared by the text and image drivers; runs as it is under
    torchrun (DistributedDataParallel, one process per device).

    model(x, y) -> (loss, metrics dict); model.param_groups(weight_decay) -> AdamW groups.
    data.batch(split, batch_size, generator) -> (x, y); data.tokens_per_sample.
    tc.batch_size is per process: each of N processes takes its slice of a global batch
    of N x batch_size drawn from the same generator, so the run matches one process with
    N times the batch.
    meta: extra entries stored in the checkpoint (e.g. the tokenizer).
    Rank 0 writes out_dir/ckpt.pt, out_dir/metrics.jsonl and out_dir/loss.png.
    """
    rank, world, device = distributed_setup(pick_device(tc.device))
    master = rank == 0
    log = log if master else (lambda *a: None)
    out = Path(tc.out_dir)
    ckpt_path, log_path = out / "ckpt.pt", out / "metrics.jsonl"
    model.to(device)
    raw_model = model
    if tc.compile:
        compile_model(model)
    optimizer = torch.optim.AdamW(raw_model.param_groups(tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95),
                                  fused=device.startswith("cuda"))
    step, records = 0, []
    if resume:
        ckpt = load_checkpoint(ckpt_path, device)
        try:
            raw_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UsageError(f"checkpoint {ckpt_path} does not fit this model ({str(e).splitlines()[0]})") from None
        step = ckpt["step"]
        if log_path.exists():
            records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
            records = [r for r in records if r["step"] <= step]
        log(f"resumed from {ckpt_path} at step {step}")
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def checkpoint():
        if master:
            save_checkpoint(ckpt_path, {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "model_config": asdict(raw_model.config), "train_config": asdict(tc),
                "step": step,  # also the data position: batches are a function of (seed, step)
                **(meta or {})})

    def record(r):
        records.append(r)
        with open(log_path, "a") as f:
            f.write(json.dumps(r) + "\n")

    n_params = sum(p.numel() for p in raw_model.parameters())
    tokens_per_step = tc.batch_size * tc.grad_accum * world * data.tokens_per_sample
    log(f"{raw_model.config.model}: {n_params / 1e6:.2f}M parameters, device {device} x {world}, "
        f"{tc.batch_size * tc.grad_accum * world} x {data.tokens_per_sample} tokens per step")
    t0, t_last, start_step = time.time(), time.time(), step
    try:
        while step < tc.max_steps:
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            for micro in range(tc.grad_accum):
                g = torch.Generator().manual_seed(batch_seed(tc.seed, step, micro))
                x, y = data.batch("train", tc.batch_size * world, g)
                x, y = x.chunk(world)[rank].to(device), y.chunk(world)[rank].to(device)
                torch.manual_seed(batch_seed(tc.seed, step, micro) + rank)  # thinking noise
                last_micro = micro == tc.grad_accum - 1
                # all-reduce gradients only once per optimizer step
                with model.no_sync() if world > 1 and not last_micro else contextlib.nullcontext():
                    with autocast(device):
                        loss, metrics = model(x, y)
                    if not torch.isfinite(loss):
                        raise NonFiniteError(f"loss is {loss.item()} at step {step}")
                    (loss / tc.grad_accum).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tc.grad_clip or float("inf"))
            if not torch.isfinite(grad_norm):
                raise NonFiniteError(f"gradient norm is {grad_norm.item()} at step {step}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            logging = step % tc.log_interval == 0 or step == tc.max_steps
            if logging and world > 1:  # report the loss over the global batch
                mean_loss = loss.detach().clone()
                torch.distributed.all_reduce(mean_loss)
                metrics["loss"] = mean_loss.item() / world
            if master and logging:
                now = time.time()
                tok_s = tokens_per_step * (step - max(start_step, step - tc.log_interval)) / max(now - t_last, 1e-9)
                t_last = now
                eta = (now - t0) / (step - start_step) * (tc.max_steps - step)
                record({"kind": "train", "step": step, "lr": lr, "grad_norm": grad_norm.item(),
                        "tokens_per_s": tok_s, **metrics})
                line = f"step {step}/{tc.max_steps} | loss {metrics['loss']:.4f}"
                if "loss_first" in metrics:
                    line += (f" (step1 {metrics['loss_first']:.3f}, last {metrics['loss_last']:.3f})"
                             f" | E {metrics['energy_start']:.2f}->{metrics['energy_end']:.2f}"
                             f" | alpha {metrics['step_size']:.1f}")
                log(line + f" | ppl {metrics['ppl']:.2f} | {tok_s / 1e3:.1f}k tok/s | ETA {format_time(eta)}")
            if master and (step % tc.eval_interval == 0 or step == tc.max_steps):
                m = evaluate(raw_model, data, tc, device)
                record({"kind": "eval", "step": step, **m})
                if "loss_per_step" in m:
                    log(f"eval step {step} | val loss after 1..{len(m['loss_per_step'])} thinking steps: "
                        + " ".join(f"{l:.4f}" for l in m["loss_per_step"]))
                else:
                    log(f"eval step {step} | val loss {m['loss']:.4f}")
                checkpoint()
                plot_metrics(records, out / "loss.png")
                t_last = time.time()  # throughput counts training only
    except KeyboardInterrupt:
        checkpoint()
        if master:
            plot_metrics(records, out / "loss.png")
        log(f"interrupted at step {step}; saved {ckpt_path} (continue with --resume)")
    except NonFiniteError as e:
        raise UsageError(f"training stopped: {e}; the last good checkpoint is {ckpt_path}; "
                         "try a lower --lr or --step_size") from None
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return records


def run_cli(main):
    """Run a driver's main(): user errors become one line on stderr and exit code 2."""
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
