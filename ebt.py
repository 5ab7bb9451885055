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
  7. images: the denoising EBT, its one-pass baseline, image data

Paper: "Energy-Based Transformers are Scalable Learners and Thinkers",
Gladstone et al., 2025 (arXiv 2507.02092).
"""

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

TEXT_KINDS = ("ebt", "transformer")
IMAGE_KINDS = ("image_ebt", "image_baseline")
MODEL_KINDS = TEXT_KINDS + IMAGE_KINDS


@dataclass
class ModelConfig:
    model: str = "ebt"            # one of MODEL_KINDS ("transformer" is the Transformer++ baseline)
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
    # "System 2" training options from the paper, all off by default
    langevin_std: float = 0.0     # std of Gaussian noise added to y before each step
    random_step_size: float = 1.0  # s > 1: per-sample alpha drawn from [alpha/s, alpha*s]
    random_steps: int = 0         # train with think_steps + U{0..random_steps} steps
    truncate: bool = False        # only the last step keeps the second-order graph
    detach: bool = True           # cut the graph between steps (False: backprop the whole path)
    # images (image_ebt, image_baseline): square crops cut into square patches
    channels: int = 3
    image_size: int = 32
    patch_size: int = 4

    def __post_init__(self):
        def check(ok, name, why):
            if not ok:
                raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r}: {why}")
        check(self.model in MODEL_KINDS, "model", f"must be one of {MODEL_KINDS}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "channels", "image_size", "patch_size"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        check(self.n_embd % self.n_head == 0, "n_embd", f"must be divisible by n_head={self.n_head}")
        if self.model in TEXT_KINDS:
            check((self.n_embd // self.n_head) % 2 == 0, "n_embd", "head size n_embd/n_head must be even for rotary")
        check(self.image_size % self.patch_size == 0, "image_size", f"must be a multiple of patch_size={self.patch_size}")
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

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


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
    ys[k] is the prediction after k steps (ys[0] is the start), energies[k] its energy."""
    ys: list
    energies: list
    steps_used: torch.Tensor = None  # per position, when stopping adaptively


def think(energy_fn, y, steps, step_size, *, create_graph=False, detach=True, truncate=False,
          langevin_std=0.0, random_step_size=1.0, tolerance=None):
    """Minimise energy_fn(y, step) -> (B, ...) energies by gradient descent on y.

    create_graph: keep the graph of each gradient so a loss on the ys trains the
        energy model through the descent (training); off for inference.
    detach: start each step from a detached y, so each step is its own graph.
    truncate: only the last step keeps create_graph.
    langevin_std: Gaussian noise added to y before each step.
    random_step_size: s > 1 draws each sample's step size from [alpha/s, alpha*s].
    tolerance: stop a position once its energy falls by less than this (inference).
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
            ys.append(y if create_graph else y.detach())
    with torch.no_grad():
        energies.append(energy_fn(y.detach(), steps))
    return Trajectory(ys, energies, steps_used)


class Thinker:
    """What every EBT (text or image) shares: a learnable step size alpha, trained with its
    own learning rate and no weight decay, and the config's thinking options passed to think().
    The model defines self.config and self.raw_step_size."""
    thinks = True  # forward takes steps= and generator= (see evaluate)

    def step_size(self):
        return self.raw_step_size.clamp(min=1e-3)  # stays positive whatever the optimizer does

    def descend(self, energy_fn, y0, steps=None, step_size=None, tolerance=None, langevin_std=0.0):
        """think() with this model's options; training adds the System 2 randomness and the
        second-order graph."""
        cfg, train = self.config, self.training
        if steps is None:
            steps = cfg.think_steps
            if train and cfg.random_steps:
                steps += int(torch.randint(cfg.random_steps + 1, ()))
        return think(energy_fn, y0, steps, self.step_size() if step_size is None else step_size,
                     create_graph=train, detach=cfg.detach, truncate=cfg.truncate,
                     langevin_std=cfg.langevin_std if train else langevin_std,
                     random_step_size=cfg.random_step_size if train else 1.0,
                     tolerance=tolerance)

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
# 4a. The autoregressive text EBT

class TextEBT(Thinker, nn.Module):
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
        shape = (B, P, self.config.vocab_size)
        if generator is None:
            return self.config.init_std * torch.randn(shape, device=device)
        return self.config.init_std * torch.randn(shape, generator=generator).to(device)

    def predict(self, idx, steps=None, step_size=None, y0=None, context=None, tolerance=None, langevin_std=0.0):
        """Think from random logits at every position of idx: (B, T). Returns a Trajectory
        whose ys are (B, T, V) logits and energies (B, T)."""
        context = self.context(idx) if context is None else context
        y0 = self.initial_logits(*idx.shape, idx.device) if y0 is None else y0
        return self.descend(lambda y, k: self.energy(y, context, k), y0, steps, step_size, tolerance, langevin_std)

    def forward(self, idx, targets, steps=None, generator=None):
        """Loss = mean over thinking steps of the cross-entropy after each step."""
        traj = self.predict(idx, steps, y0=self.initial_logits(*idx.shape, idx.device, generator))
        losses = torch.stack([F.cross_entropy(y.flatten(0, 1), targets.flatten()) for y in traj.ys[1:]])
        loss = losses.mean()
        metrics = {"loss": loss.item(), "loss_first": losses[0].item(), "loss_last": losses[-1].item(),
                   "ppl": math.exp(min(losses[-1].item(), 50.0)),
                   "energy_start": traj.energies[0].mean().item(), "energy_end": traj.energies[-1].mean().item(),
                   "step_size": self.step_size().item()}
        if not self.training:
            metrics["loss_per_step"] = [l.item() for l in losses]
        return loss, metrics


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
    kinds = {"ebt": TextEBT, "transformer": Transformer, "image_ebt": ImageEBT, "image_baseline": ImageBaseline}
    return kinds[cfg.model](cfg)


# -----------------------------------------------------------------------------
# 5. Text data and tokenizers

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
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
    """A token stream split 90/10 into train and validation. Batches are random windows
    drawn from a generator whose state is saved in checkpoints (the data position)."""

    def __init__(self, ids, block_size, seed=0, source="text"):
        ids = torch.tensor(ids, dtype=torch.long)
        n_val = max(len(ids) // 10, block_size + 1)
        if len(ids) - n_val < block_size + 1:
            raise UsageError(f"{source} has {len(ids)} tokens: too short for block size {block_size} "
                             f"(needs at least {2 * (block_size + 1)}); use more text or a smaller --block_size")
        self.split = {"train": ids[:-n_val], "val": ids[-n_val:]}
        self.block_size = self.tokens_per_sample = block_size
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, split, batch_size, generator=None):
        data = self.split[split]
        g = self.generator if generator is None else generator
        start = torch.randint(len(data) - self.block_size, (batch_size,), generator=g)
        offsets = start[:, None] + torch.arange(self.block_size + 1)
        chunk = data[offsets]
        return chunk[:, :-1], chunk[:, 1:]  # inputs, next-token targets

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


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
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class NonFiniteError(Exception):
    pass


def train(model, data, tc, meta=None, resume=False, log=print):
    """The training loop shared by the text and image drivers.

    model(x, y) -> (loss, metrics dict); model.param_groups(weight_decay) -> AdamW groups.
    data.batch(split, batch_size, generator=None) -> (x, y); data.tokens_per_sample (for
    throughput); data.state_dict() / load_state_dict() (the data position).
    meta: extra entries stored in the checkpoint (e.g. the tokenizer).
    Writes out_dir/ckpt.pt, out_dir/metrics.jsonl and out_dir/loss.png.
    """
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out / "ckpt.pt", out / "metrics.jsonl"
    device = pick_device(tc.device)
    torch.manual_seed(tc.seed)
    model.to(device)
    optimizer = torch.optim.AdamW(model.param_groups(tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95),
                                  fused=device.startswith("cuda"))
    step, records = 0, []
    if resume:
        ckpt = load_checkpoint(ckpt_path, device)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UsageError(f"checkpoint {ckpt_path} does not fit this model ({str(e).splitlines()[0]})") from None
        data.load_state_dict(ckpt["data"])
        torch.set_rng_state(ckpt["rng"].cpu())
        step = ckpt["step"]
        if log_path.exists():
            records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
            records = [r for r in records if r["step"] <= step]
        log(f"resumed from {ckpt_path} at step {step}")
    log_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def checkpoint():
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "model_config": asdict(model.config), "train_config": asdict(tc),
            "step": step, "data": data.state_dict(), "rng": torch.get_rng_state(), **(meta or {})})

    def record(r):
        records.append(r)
        with open(log_path, "a") as f:
            f.write(json.dumps(r) + "\n")

    n_params = sum(p.numel() for p in model.parameters())
    log(f"{model.config.model}: {n_params / 1e6:.2f}M parameters, device {device}, "
        f"{tc.batch_size * tc.grad_accum} x {data.tokens_per_sample} tokens per step")
    tokens_per_step = tc.batch_size * tc.grad_accum * data.tokens_per_sample
    t0, t_last, start_step = time.time(), time.time(), step
    stop = None
    try:
        while step < tc.max_steps:
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            metrics = {}
            for _ in range(tc.grad_accum):
                x, y = data.batch("train", tc.batch_size)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast(device):
                    loss, metrics = model(x, y)
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"loss is {loss.item()} at step {step}")
                (loss / tc.grad_accum).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
            if not torch.isfinite(grad_norm):
                raise NonFiniteError(f"gradient norm is {grad_norm.item()} at step {step}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            if step % tc.log_interval == 0 or step == tc.max_steps:
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
                quality = "".join(f" | {k} {metrics[k]:.2f}" for k in ("ppl", "psnr") if k in metrics)
                log(line + f"{quality} | {tok_s / 1e3:.1f}k tok/s | ETA {format_time(eta)}")
            if step % tc.eval_interval == 0 or step == tc.max_steps:
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
                plot_metrics(records, out / "loss.png")
                t_last = time.time()  # throughput counts training only
    except KeyboardInterrupt:
        stop = "interrupted"
    except NonFiniteError as e:
        raise UsageError(f"training stopped: {e}; the last good checkpoint is {ckpt_path}; "
                         "try a lower --lr or --step_size") from None
    if stop:
        checkpoint()
        plot_metrics(records, out / "loss.png")
        log(f"interrupted at step {step}; saved {ckpt_path} (continue with --resume)")
    return records


def run_cli(main):
    """Run a driver's main(): user errors become one line on stderr and exit code 2."""
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# -----------------------------------------------------------------------------
# 7. Images: the denoising EBT
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
        self.step_emb = nn.Embedding(cfg.think_steps + cfg.random_steps, cfg.n_embd)
        self.energy_head = nn.Linear(cfg.n_embd, 1, bias=False)
        self.apply(init_weights)
        self.raw_step_size = nn.Parameter(torch.tensor(float(cfg.step_size)))

    def energy(self, img, step):
        """img: (B, C, S, S) candidates. Returns energies (B,)."""
        cond = self.step_emb.weight[min(step, self.step_emb.num_embeddings - 1)]
        # second derivatives are needed only when training through the descent
        double_backward = self.training and torch.is_grad_enabled()
        return self.energy_head(self.body(img, cond, double_backward)).squeeze(-1).mean(1)

    def predict(self, noisy, steps=None, step_size=None):
        """Think from the noisy image (B, C, S, S). Returns a Trajectory of images and energies (B,)."""
        return self.descend(self.energy, noisy, steps, step_size)

    def forward(self, noisy, clean, steps=None, generator=None):
        """Loss = mean over thinking steps of the smooth-L1 distance to the clean image.
        generator is accepted for evaluate() and unused: the starting point is not random."""
        traj = self.predict(noisy, steps)
        losses = torch.stack([F.smooth_l1_loss(y, clean) for y in traj.ys[1:]])
        loss = losses.mean()
        metrics = {"loss": loss.item(), "loss_first": losses[0].item(), "loss_last": losses[-1].item(),
                   "psnr": psnr(traj.ys[-1].detach(), clean).mean().item(),
                   "energy_start": traj.energies[0].mean().item(), "energy_end": traj.energies[-1].mean().item(),
                   "step_size": self.step_size().item()}
        if not self.training:
            metrics["loss_per_step"] = [l.item() for l in losses]
            metrics["psnr_per_step"] = [psnr(y, clean).mean().item() for y in traj.ys[1:]]
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

    def forward(self, noisy, clean):
        pred = self.denoise(noisy)
        loss = F.smooth_l1_loss(pred, clean)
        return loss, {"loss": loss.item(), "psnr": psnr(pred.detach(), clean).mean().item()}

    def param_groups(self, weight_decay):
        return decay_groups(self.parameters(), weight_decay)


# Image data: images are (C, H, W) tensors, float in [0, 1] or uint8 (the downloaded datasets,
# four times smaller in memory).

def check_noise_std(std):
    if not (math.isfinite(std) and 0 <= std <= 10):
        raise UsageError(f"noise level {std} is not a standard deviation between 0 and 10 (pixels are in [0, 1])")
    return std


class ImageData:
    """Random square crops with Gaussian noise: batch -> (noisy, clean), each (B, C, S, S).
    Crop positions and noise come from a generator whose state is saved in checkpoints."""

    def __init__(self, train, val, crop, noise_std, seed=0, source="images"):
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
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, split, batch_size, generator=None):
        images, S = self.split[split], self.crop
        g = self.generator if generator is None else generator
        crops = []
        for i in torch.randint(len(images), (batch_size,), generator=g).tolist():
            H, W = images[i].shape[-2:]
            top, left = (int(torch.randint(n - S + 1, (), generator=g)) for n in (H, W))
            crops.append(images[i][:, top:top + S, left:left + S])
        clean = torch.stack(crops)
        clean = clean.float() / 255 if clean.dtype == torch.uint8 else clean
        return clean + self.noise_std * torch.randn(clean.shape, generator=g), clean

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


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
