"""
nanoEBT: Energy-Based Transformers in one file.

An EBT is a transformer that scores a (context, candidate prediction) pair with one scalar energy
E(x, y), low when y fits x. It predicts by *thinking*: start from random logits y and descend the
energy of the candidate distribution p,

    p = softmax(y);   y <- p - step_size * dE(x, p)/dp,

and it is trained end to end through those steps (second-order gradients), so it learns a landscape
whose descent lands on the right answer.

Reading order: 1. configuration; 2. the transformer blocks; 3. thinking: think(), one descent loop for text
and images, Thinker, what every EBT shares, and the paper's recipes; 4. the text EBT and its Transformer++
baseline; 5. the training loop; 6. generation and evaluation. The image EBT: image_models.py.
Paper: "Energy-Based Transformers are Scalable Learners and Thinkers", Gladstone et al., 2025 (arXiv
2507.02092); the method follows its code (github.com/alexiglad/EBT).
"""

import contextlib
import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from checks import UsageError, check_generate, check_model_config, check_train_config, non_finite

# Thinking sharpens candidates until some probabilities fall below float32's normal range (1e-38);
# CPUs compute with such denormal numbers many times slower, and they mean nothing here.
torch.set_flush_denormal(True)


# -----------------------------------------------------------------------------
# 1. Configuration

TEXT_KINDS = ("ebt", "transformer")
IMAGE_KINDS = ("image_ebt", "image_dit", "image_regressor")
EBT_KINDS = ("ebt", "image_ebt")  # the models that think (as objects: isinstance(model, Thinker))
VERIFY_LANGEVIN_STD = 1.0  # inference noise for self-verification candidates (the paper's)
THINK_LONGER = 4  # evaluation and the plots think this many times the trained steps: where more thinking goes
MAX_SEED = 2**62  # seeds are 0..MAX_SEED - 1: torch's generators take 64 bits
DDPM_STEPS = 1000  # the image noise: a DDPM forward process over this many steps
MIN_STEP_SIZE = 1e-3  # alpha's floor (the paper's code clamps at 1e-4 and then gives alpha no gradient)


def option(default, help, least=-math.inf, most=math.inf, thinking=None):
    """A config field with its help text (the drivers make their flags from these: cli.py), for a number the least
    and most it may be, and whether it sets how a model thinks ("text": a text EBT's only; "all")."""
    return field(default=default, metadata={"help": help, "limits": (least, most), "thinking": thinking})


@dataclass
class ModelConfig:  # each field: option(default, help, least, most), checked by check_fields
    model: str = option("ebt", "ebt or transformer (the Transformer++ baseline); image_ebt, image_dit, image_regressor")
    vocab_size: int = option(65, "token ids", 1)
    block_size: int = option(256, "context length", 1)
    n_layer: int = option(6, "transformer blocks", 1)
    n_head: int = option(6, "attention heads", 1)
    n_embd: int = option(384, "model width", 1)
    mlp_hidden: int = option(0, "SwiGLU hidden width; 0 = n_embd, as in the paper's models", 0)
    # thinking (EBTs): the defaults are the paper's S1 at its vocabulary (recipes: RECIPES, derive_thinking)
    think_steps: int = option(2, "descent steps in training", 1, thinking="all")
    landscapes: int = option(2, "step embeddings: step k descends landscape min(k, landscapes - 1)", 1, thinking="all")
    step_size: float = option(500.0, "alpha, the step size of the descent (its start, when learned)", 0, thinking="all")
    learn_step_size: bool = option(True, "learn alpha (own learning rate, no weight decay)", thinking="all")
    step_size_lr_mult: float = option(1500.0, "alpha's learning rate / the base learning rate", 0, 1e6, thinking="all")
    init_std: float = option(1.0, "thinking starts from logits drawn from N(0, init_std^2)", 0, 1e3, thinking="text")
    langevin_std: float = option(0.0, "training: Gaussian noise of this std on the logits before each step", 0, 1e3,
                                 thinking="all")
    random_step_size: float = option(1.0, "training: each token's alpha drawn from U[alpha/s, alpha*s]; 1 = off", 1,
                                     thinking="all")
    random_steps: int = option(0, "training: think_steps + U{0..n} steps, one count per optimizer step", 0,
                               thinking="all")
    truncate: bool = option(False, "train the last step only: only its gradient keeps its graph", thinking="all")
    detach: bool = option(True, "cut the graph between steps", thinking="all")
    replay_size: int = option(0, "replay buffer: the final logits of the last N training sequences; 0 = off", 0,
                              thinking="text")
    replay_batch: float = option(0.5, "replayed sequences joining each batch, a fraction of it", 0, 1e3,
                                 thinking="text")
    # images: square crops in [-1, 1], cut into square patches
    channels: int = option(3, "image channels", 1)
    image_size: int = option(32, "crop size in pixels", 1)
    patch_size: int = option(4, "patch size in pixels", 1)
    noise_t: int = option(99, "training noise, a DDPM step (the DiT trains on 1..noise_t)", 1, DDPM_STEPS)

    def __post_init__(self):
        check_model_config(self, TEXT_KINDS, IMAGE_KINDS)  # each field's type and range, and how they relate
        self.mlp_hidden = self.mlp_hidden or self.n_embd


@dataclass
class TrainConfig:
    max_steps: int = option(5000, "optimizer steps", 1, 10**9)
    batch_size: int = option(64, "sequences (or crops) per optimizer step and process", 1)
    grad_accum: int = option(1, "micro-batches per optimizer step, each of batch_size", 1, 1024)
    lr: float = option(1e-3, "learning rate after warm-up, decayed by cosine to a tenth", 0)
    warmup_steps: int = option(100, "linear warm-up steps", 0)
    weight_decay: float = option(0.1, "AdamW weight decay of the matrices", 0)
    grad_clip: float = option(1.0, "clip the gradient norm to this; 0 = off", 0)
    eval_interval: int = option(250, "evaluate and save every this many steps", 1)
    eval_batches: int = option(20, "validation batches per evaluation", 1, 1000)
    eval_steps: int = option(0, f"EBTs: thinking steps at evaluation; 0 = {THINK_LONGER}x the trained steps", 0, 1000)
    log_interval: int = option(10, "log every this many steps", 1)
    out_dir: str = option("out", "checkpoint, metrics.jsonl and loss.png go here")
    device: str = option("auto", "auto (cuda, then mps, then cpu), cpu, cuda or mps")
    seed: int = option(1337, "fixes the initial weights, the batches and the noise (torch's generators take 64 bits)",
                       0, MAX_SEED - 1)
    compile: bool = option(False, "torch.compile the training step whole and thinking at inference (compiled.py)")

    def __post_init__(self):
        check_train_config(self)


# -----------------------------------------------------------------------------
# 2. Transformer blocks (Llama style: RMSNorm, rotary positions, SwiGLU, no biases)

def RMSNorm(dim):
    return nn.RMSNorm(dim, eps=1e-6)  # the fused op has a double backward too


class Rotary(nn.Module):
    """Rotary positions: x * cos + swap_halves(x) * sin, tables widened to Dh: four ops, differentiated twice."""

    def __init__(self, head_dim, max_positions, base=10000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(max_positions).float(), inv_freq)  # (P, Dh/2)
        self.register_buffer("cos", torch.cat([angles.cos(), angles.cos()], -1), persistent=False)  # (P, Dh)
        self.register_buffer("sin", torch.cat([-angles.sin(), angles.sin()], -1), persistent=False)

    def forward(self, x, start, factor=1.0):
        """x: (B, H, T, Dh), token t sits at position start + t (start: an int, or a tensor in a KVCache, so that
        the shapes stay fixed); factor multiplies the result."""
        at = start + torch.arange(x.shape[-2], device=x.device)
        cos, sin = (t[at].to(x.dtype) * factor for t in (self.cos, self.sin))  # (T, Dh): multiplied, not x
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def causal_mask(q_len, k_len, device, seen=None):
    """(q_len, k_len) boolean mask: query i, the token after `seen` others, sees keys 0..seen + i. By default
    the queries are the last q_len keys; in a preallocated cache the keys after seen + q_len are empty."""
    seen = k_len - q_len if seen is None else seen
    return torch.arange(k_len, device=device) <= seen + torch.arange(q_len, device=device)[:, None]


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
        return (q, k, v) if rotary is None else (rotary(q, start), rotary(k, start), v)

    def merge(self, y):
        B, H, T, Dh = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, H * Dh))

    def forward(self, x, rotary, cache=None):
        """Causal attention of the context stream x (B, T, D); with a KVCache layer's (keys, values, tokens held),
        x's keys and values are written after those. Returns the output and the (k, v) attended."""
        if cache is None:
            q, k, v = self.heads(x, rotary)
            return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=True)), (k, v)
        keys, values, seen = cache
        q, k, v = self.heads(x, rotary, seen)
        at = seen + torch.arange(x.shape[1], device=x.device)
        keys.index_copy_(2, at, k)
        values.index_copy_(2, at, v)
        visible = causal_mask(x.shape[1], keys.shape[-2], x.device, seen)
        return self.merge(F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)), (keys, values)

    def attend_predictions(self, x, rotary, context, double_backward, filled=None):
        """The prediction stream: x (B, P, D) stands for the next token after each of the last P context
        tokens. Prediction p sees the context up to its position (context: this layer's (k, v), each
        (B, H, T, Dh), the first `filled` positions holding tokens, all if None) and itself, never another."""
        k_ctx, v_ctx = context
        T, P = k_ctx.shape[-2], x.shape[1]
        seen = (T if filled is None else filled) - P  # prediction p follows context token seen + p
        start = seen + 1  # and sits one past it
        visible = causal_mask(P, T, x.device, seen)  # (P, T)
        if double_backward:
            # Explicit softmax: fused kernels have no second derivative. Differentiated twice, each op saved counts
            # thrice: a rotation keeps the dot product of two vectors at one position, so a prediction scores its
            # own key unrotated, only the query rotated; 1/sqrt(Dh) rides on the rotary tables; the mask is added.
            q, k, v = self.heads(x)
            inv_sqrt_dh = q.shape[-1] ** -0.5
            to_self = (q * k).sum(-1, keepdim=True) * inv_sqrt_dh  # (B, H, P, 1)
            mask_bias = torch.zeros(P, T, dtype=q.dtype, device=x.device).masked_fill_(~visible, float("-inf"))
            to_context = rotary(q, start, inv_sqrt_dh) @ k_ctx.transpose(-2, -1) + mask_bias  # (B, H, P, T)
            att_context, att_self = torch.cat([to_context, to_self], dim=-1).softmax(dim=-1).split([T, 1], dim=-1)
            y = att_context @ v_ctx + att_self * v
        else:
            q, k, v = self.heads(x, rotary, start)
            keys, values = torch.cat([k_ctx, k], dim=2), torch.cat([v_ctx, v], dim=2)
            only_self = torch.eye(P, dtype=torch.bool, device=x.device)
            # compiled: the math backend, plain ops the compiler fuses (the fused kernel's backward is slow)
            with sdpa_kernel(SDPBackend.MATH) if torch.compiler.is_compiling() else contextlib.nullcontext():
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=torch.cat([visible, only_self], dim=1))
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

    def forward(self, x, rotary, cache=None):
        a, kv = self.attn(self.attn_norm(x), rotary, cache)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), kv

    def forward_predictions(self, x, rotary, context, double_backward, filled=None):
        x = x + self.attn.attend_predictions(self.attn_norm(x), rotary, context, double_backward, filled)
        return x + self.mlp(self.mlp_norm(x))


class CausalTransformer(nn.Module):
    """Token embedding and causal blocks: the Transformer++, and the context stream of the text EBT."""

    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.rotary = Rotary(cfg.n_embd // cfg.n_head, cfg.block_size + 1)  # +1: a prediction sits past its token

    def forward(self, idx, cache=None):
        """idx (B, T), after the KVCache's tokens if one is given: hidden states (B, T, D) and each layer's (k, v)."""
        x, kvs = self.tok_emb(idx), []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, self.rotary, None if cache is None else (*cache.kv[i], cache.filled))
            kvs.append(kv)
        if cache is not None:
            cache.filled += idx.shape[1]
        return x, kvs


class KVCache:
    """Generation's context keys and values, preallocated (fixed shapes: a compiled token is one graph): per layer
    (B, H, block_size, Dh), the first `filled` positions holding tokens."""

    def __init__(self, model, batch, device):
        cfg, kind = model.config, device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else model.trunk.tok_emb.weight.dtype
        shape = (batch, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        self.kv = [tuple(torch.zeros(shape, device=device, dtype=dtype) for _ in "kv") for _ in range(cfg.n_layer)]
        self.filled = torch.zeros((), dtype=torch.long, device=device)  # a tensor: the shapes stay fixed


def init_weights(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        if getattr(module, "zero_init", False):
            for p in module.parameters():
                nn.init.zeros_(p)
        else:
            nn.init.normal_(module.weight, mean=0.0, std=0.02)


# -----------------------------------------------------------------------------
# 3. Thinking: gradient descent on the energy

@dataclass
class Trajectory:
    """ys[k]: the state after k steps (ys[0] the start; with a hand-off, the start and the last). energies[k]:
    state k's on step k's landscape; at inference also the final state's, on the last step's (like with like)."""
    ys: list
    energies: list
    steps_used: torch.Tensor = None  # per position, thinking adaptively


def energy_and_gradient(energy_fn, x, k, create_graph):
    """energy_fn(x, k) (B, ...) and the gradient of its sum with respect to x."""
    x = x if x.requires_grad else x.detach().requires_grad_()
    energy = energy_fn(x, k)
    (grad,) = torch.autograd.grad(energy.sum(), x, create_graph=create_graph)
    return energy, grad


def think(energy_fn, y, steps, step_size, *, normalize=None, create_graph=False, detach=True, truncate=False,
          langevin_std=0.0, on_step=None, gradient=energy_and_gradient):
    """Minimise energy_fn(x, k) -> (B, ...) energies by `steps` steps of gradient descent from y. Step k scores
    the candidate x = normalize(y) (text: the distribution softmax(y); images: y itself)
    and moves to y <- x - step_size * dE/dx: for text the gradient is with respect to the probabilities
    and the new logits replace the old ones, as in the paper's code (model/nlp/ebt.py, EBT_NLP.forward
    with normalize_initial_condition). step_size: a number, or a tensor that broadcasts against y.
    create_graph (training): keep each gradient's graph, so that a loss on the ys trains the energy
    through the descent; detach: each step its own graph; truncate: only the last step keeps it.
    on_step(k, y) -> y: the hand-off (training backpropagates the step's loss there). gradient: how
    (energy, dE/dx) are computed (traced when compiled). Inference also scores the final state. The options
    stay separate arguments, so that what a recipe changes shows in the step (Thinker.think passes them)."""
    normalize = normalize or (lambda t: t)
    ys, energies = [y], []
    with torch.enable_grad():
        for k in range(steps):
            if langevin_std > 0:
                y = y + langevin_std * torch.randn_like(y)
            x = normalize(y)
            if detach or not create_graph:
                x = x.detach()
            keep_graph = create_graph and (not truncate or k == steps - 1)
            energy, grad = gradient(energy_fn, x, k, keep_graph)
            y = (x if create_graph else x.detach()) - step_size * grad  # inference: no graph back to x
            if on_step is not None:  # the hand-off takes each state; keep the start only, (B, S, V) each
                del ys[1:]
                y = on_step(k, y)
            ys.append(y)
            energies.append(energy if keep_graph else energy.detach())
    if not create_graph:
        with torch.no_grad():
            energies.append(energy_fn(normalize(y), steps - 1))
    return Trajectory(ys, energies)


def think_adaptively(energy_fn, y, steps, step_size, tolerance, **options):
    """Inference only: think() a step at a time; a position stops once its step lowers its energy by less
    than tolerance, both scored on the landscape that step descended (E(y_k, step k) - E(y_k+1, step k+1)
    would count the change of step embedding). Thinking ends when every position has stopped."""
    ys, energies, active = [y], [], None
    for k in range(steps):
        before, after = (step := think(lambda x, _: energy_fn(x, k), y, 1, step_size, **options)).energies
        active = torch.ones_like(before, dtype=torch.bool) if active is None else active
        steps_used = active.long() if k == 0 else steps_used + active
        y = torch.where(active.reshape(active.shape + (1,) * (y.dim() - active.dim())), step.ys[1], y)
        ys.append(y)
        energies.append(before)
        final = torch.where(active, after, before)  # a stopped position kept its state
        active = active & (before - after > tolerance)
        if not active.any():
            break
    return Trajectory(ys, energies + [final], steps_used)


class Thinker:
    """What every EBT shares: the step size alpha, how many steps, and think() and learning through it with the
    config's options. A model that thinks sets what follows and defines its energy."""
    config: ModelConfig
    raw_step_size: nn.Parameter  # alpha before its floor: learned, unless the recipe fixes it
    energy_ndim: int  # the dimensions of its energies: 1, (B,) one per image; 2, (B, P) one per token
    normalize = None  # the candidate scored, from the state y (text: softmax(y)); None: y itself
    gradient = staticmethod(energy_and_gradient)  # compiled: by torch.func (compiled.py)

    def step_size(self, y0=None):
        """alpha, kept >= MIN_STEP_SIZE in value, its gradient passing the floor so that alpha can come back. For a
        descent from y0 in training with random_step_size s > 1 (S2): alpha x U[1/s, s] per energy (token or image),
        drawn once for the whole descent. At inference nothing is learned."""
        raw = self.raw_step_size
        alpha = raw + (raw.clamp(min=MIN_STEP_SIZE) - raw).detach()
        s, d = self.config.random_step_size, self.energy_ndim
        if not self.training:
            return alpha.detach()
        if y0 is None or s == 1:
            return alpha
        shape = y0.shape[:d] + (1,) * (y0.dim() - d)
        return alpha * torch.empty(shape, dtype=y0.dtype, device=y0.device).uniform_(1 / s, s)

    def differentiates_twice(self):
        """In training through the descent; then attention is explicit (fused kernels have no double backward)."""
        return self.training and torch.is_grad_enabled()

    def trained_steps(self):
        """The most steps training takes (S2: 2 or 3, so 3)."""
        return self.config.think_steps + self.config.random_steps

    def draw_steps(self, rng=random):
        """Training's step count, think_steps + U{0..random_steps} (a Python rng: no device read)."""
        return self.config.think_steps + rng.randrange(self.config.random_steps + 1)

    def step_count(self, steps=None):
        """How many steps to think: as asked, else a draw in training and the trained steps at inference."""
        return steps or (self.draw_steps() if self.training else self.trained_steps())

    def think(self, energy_fn, y0, steps=None, step_size=None, langevin_std=0.0, tolerance=None, on_step=None):
        """think() with this model's options; energy_fn(x, landscape), step k on landscape min(k, landscapes - 1).
        Training adds the second-order graph and S2's randomness (step_size, Langevin noise); at inference
        step_size, langevin_std and tolerance (think_adaptively) may be chosen."""
        cfg, training, steps = self.config, self.training, self.step_count(steps)
        on_landscape = lambda x, k: energy_fn(x, min(k, cfg.landscapes - 1))
        step_size = self.step_size(y0) if step_size is None else step_size
        options = dict(normalize=self.normalize, langevin_std=cfg.langevin_std if training else langevin_std,
                       gradient=self.gradient)
        if tolerance is not None:
            return think_adaptively(on_landscape, y0, steps, step_size, tolerance, **options)
        return think(on_landscape, y0, steps, step_size, create_graph=training, detach=cfg.detach,
                     truncate=cfg.truncate, on_step=on_step, **options)

    def step_weights(self, steps):
        """Each step's weight in the descent's loss: the mean over the steps (S1), or with truncate the last step
        alone (S2). The one definition of the loss: forward() sums it, learn() backpropagates it a step at a time."""
        return [float(k == steps - 1) for k in range(steps)] if self.config.truncate else [1 / steps] * steps

    def loss(self, losses):
        """The descent's loss from each step's loss (a step of weight 0 is left out: its loss may be anything)."""
        return sum(w * loss for w, loss in zip(self.step_weights(len(losses)), losses) if w)

    def think_and_backward(self, energy_fn, y0, target, loss_fn, weight, steps=None, leaves=()):
        """Think from y0 and backpropagate Thinker.loss of the steps' loss_fn(y, target) x weight into the parameters
        and `leaves` (what energy_fn reads: TextEBT.learn), not into a step's start. Where the steps' graphs share
        only those (detach or truncate), each step's loss is backpropagated at once: the same gradient, one step's
        second-order graph alive instead of all; else the whole descent at the end. Returns (trajectory, losses)."""
        cfg, steps = self.config, self.step_count(steps)
        weights = self.step_weights(steps)
        drawn = self.step_size(y0)  # a leaf for the steps too: each step's backward frees its own graph
        step_size = drawn.detach().requires_grad_(drawn.requires_grad)
        inputs = [t for t in (*self.parameters(), *leaves, step_size) if t.requires_grad]
        stepwise, losses = cfg.detach or cfg.truncate, []

        def backward_step(k, y):  # think()'s hand-off
            loss = loss_fn(y, target)
            losses.append(loss.detach() if stepwise else loss)
            if stepwise and weights[k]:
                (loss * (weights[k] * weight)).backward(inputs=inputs)
                return y.detach()
            return y
        traj = self.think(energy_fn, y0, steps, step_size, on_step=backward_step)
        if not stepwise:
            (self.loss(losses) * weight).backward(inputs=inputs)
        if step_size.grad is not None:
            drawn.backward(step_size.grad)
        return traj, [loss.detach() for loss in losses]

    def metrics(self, traj, losses):
        """What the log shows, as tensors. energy_last: in training that of the last step's start."""
        m = {"loss": self.loss(losses).detach(), "loss_first": losses[0].detach(), "loss_last": losses[-1].detach(),
             "energy_first": traj.energies[0].detach().mean(), "energy_last": traj.energies[-1].detach().mean(),
             "step_size": self.step_size().detach()}
        if not self.training:
            m["loss_per_step"] = torch.stack(losses).detach()
        return m


# The paper's training recipes (its job scripts job_scripts/nlp/pretrain/ebt_s1.sh and ebt_s2.sh), as the ModelConfig
# fields each sets; the drivers layer flags over them, and derive_thinking() fills what is left as None.
RECIPES = {
    # 2 steps, one step embedding each, alpha learned (no weight decay), the mean cross-entropy over steps
    "s1": dict(think_steps=2, landscapes=None, random_steps=0, step_size=None, learn_step_size=True,
               step_size_lr_mult=None, langevin_std=0.0, random_step_size=1.0, truncate=False, detach=True,
               replay_size=0),
    # one landscape descended 2 or 3 times, alpha 5 fixed, per-token alpha in [alpha/2, 2 alpha], Langevin
    # noise 3, no detach, the last step trained only, a replay buffer of 192 sequences
    "s2": dict(think_steps=2, landscapes=1, random_steps=1, step_size=5.0, learn_step_size=False,
               step_size_lr_mult=None, langevin_std=3.0, random_step_size=2.0, truncate=True, detach=False,
               replay_size=192),
}
IMAGE_RECIPES = {  # S1 as the paper's image runs (1 step; alpha 3000 at 128 x 128, 1000 at 32 x 32), S2 as text's
    "s1": dict(think_steps=1, landscapes=1, random_steps=0, random_step_size=1.0, truncate=False, detach=True,
               step_size=1000.0, step_size_lr_mult=None),
    "s2": dict(think_steps=2, landscapes=1, random_steps=1, random_step_size=2.0, truncate=True, detach=False,
               step_size=1000.0, step_size_lr_mult=None),
}


def derive_thinking(values):
    """Fill what a recipe leaves as None (values: ModelConfig fields): S1's landscape per step; S1's alpha from
    the vocabulary, 0.25 sqrt(V), the best of a sweep at V = 65 (2.0) and near it at 50,257 (56; the paper's 500
    was tuned at 50,277: assets/recipes.md); alpha's learning rate 3 x alpha (the paper's 1500 at 500)."""
    if values.get("landscapes", 0) is None:
        values["landscapes"] = values["think_steps"]
    if values.get("step_size", 0) is None:
        values["step_size"] = round(0.25 * values["vocab_size"] ** 0.5, 1)
    if values.get("step_size_lr_mult", 0) is None:
        values["step_size_lr_mult"] = 3 * values["step_size"]
    return values


# -----------------------------------------------------------------------------
# 4. The autoregressive text EBT, and the Transformer++ baseline

def cross_entropy(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class TextEBT(Thinker, nn.Module):
    """Scores, for every position i, a candidate distribution over the next token. Two streams share one set of
    blocks: the context tokens (causal attention) and one prediction token per position, embedded from its
    candidate p as p @ W. The context never looks at predictions, so its keys and values are computed once and
    reused at every thinking step (the paper's code runs both streams again at every step)."""
    energy_ndim = 2  # energies (B, P), one per position
    padded = None  # (V,) True at the ids no token has (a padded vocab_size; rundir.load_text_model): never thought of

    def normalize(self, logits):  # the candidate is a distribution, over the ids that have a token
        return (logits if self.padded is None else logits.masked_fill(self.padded, -math.inf)).softmax(-1)

    def __init__(self, cfg):
        super().__init__()
        assert cfg.model == "ebt"
        self.config = cfg
        self.trunk = CausalTransformer(cfg)
        self.pred_emb = nn.Linear(cfg.vocab_size, cfg.n_embd, bias=False)  # probs -> embedding
        self.step_emb = nn.Embedding(cfg.landscapes, cfg.n_embd)
        self.norm = RMSNorm(cfg.n_embd)
        self.energy_head = nn.Linear(cfg.n_embd, 1, bias=False)
        self.apply(init_weights)
        # p @ W averages rows of W, so at std 0.02 a step embedding of the same std would drown the
        # candidate: W is xavier-normal (the paper's init) and the step embeddings start at zero.
        nn.init.xavier_normal_(self.pred_emb.weight)
        nn.init.zeros_(self.step_emb.weight)
        self.raw_step_size = nn.Parameter(torch.tensor(float(cfg.step_size)), requires_grad=cfg.learn_step_size)
        self.replay = ReplayBuffer(cfg.replay_size) if cfg.replay_size else None

    def context(self, idx, cache=None):
        """Per-layer (k, v) of the context stream, each (B, H, T, Dh) (with a KVCache T = block_size)."""
        return self.trunk(idx, cache)[1]

    def energy(self, probs, context, landscape, filled=None):
        """Energies (B, P) of probs (B, P, V): candidates for the token after each of the last P in context
        (of which the first `filled` positions hold tokens, all if None)."""
        x, double_backward = self.pred_emb(probs) + self.step_emb.weight[landscape], self.differentiates_twice()
        for block, kv in zip(self.trunk.blocks, context):
            x = block.forward_predictions(x, self.trunk.rotary, kv, double_backward, filled)
        return self.energy_head(self.norm(x)).squeeze(-1)

    def initial_logits(self, B, P, device, generator=None):
        """Random starting logits (B, P, V) from N(0, init_std^2); a generator (on the CPU) repeats them."""
        shape, dtype = (B, P, self.config.vocab_size), self.pred_emb.weight.dtype
        if generator is None:
            return self.config.init_std * torch.randn(shape, device=device, dtype=dtype)
        return self.config.init_std * torch.randn(shape, generator=generator, dtype=dtype).to(device)

    def forward(self, idx, targets, steps=None, generator=None, y0=None):
        """Think from y0 (random logits if None) at every position of idx (B, S): (Thinker.loss of the steps'
        cross-entropies, metrics). In training mode the loss's graph runs through the whole descent (the compiled
        training step differentiates it: compiled.py), and the metrics hold the final logits (for the replay buffer)."""
        context = self.context(idx)
        y0 = self.initial_logits(*idx.shape, idx.device, generator) if y0 is None else y0
        traj = self.think(lambda p, k: self.energy(p, context, k), y0, steps)
        losses = [cross_entropy(y, targets) for y in traj.ys[1:]]
        return self.loss(losses), {**self.metrics(traj, losses), **({"final": traj.ys[-1]} if self.training else {})}

    def learn(self, idx, targets, weight, steps=None, generator=None):
        """One training batch: the gradient of forward()'s loss x weight, backpropagated a step at a time
        (think_and_backward). The context stream runs without a graph, its keys and values leaves of the steps,
        then again with its graph to take what they collected (one more forward instead of its activations)."""
        fresh = len(idx)
        idx, targets, y0 = self.training_starts(idx, targets, generator)
        with torch.no_grad():
            context = [tuple(t.requires_grad_() for t in kv) for kv in self.context(idx)]
        leaves = [t for kv in context for t in kv]
        traj, losses = self.think_and_backward(lambda p, k: self.energy(p, context, k), y0, targets,
                                                 cross_entropy, weight, steps, leaves)
        torch.autograd.backward([t for kv in self.context(idx) for t in kv], [t.grad for t in leaves])
        self.remember(idx[:fresh], targets[:fresh], traj.ys[-1][:fresh])
        return self.metrics(traj, losses)

    def training_starts(self, idx, targets, generator=None):
        """A training batch's random starting logits; with a replay buffer, the batch extended by earlier
        sequences, each starting where its descent ended. Returns (idx, targets, y0)."""
        y0 = self.initial_logits(*idx.shape, idx.device, generator)
        if self.replay is None:
            return idx, targets, y0
        return self.replay.extend(idx, targets, y0, round(self.config.replay_batch * len(idx)))

    def remember(self, idx, targets, final):
        """The replay buffer keeps where the batch's own (not replayed) sequences ended."""
        if self.replay is not None:
            self.replay.add(idx, targets, final)

    def think_candidates(self, context, P, candidates=1, generator=None, y0=None, langevin_std=None, filled=None,
                         **thinking):
        """Think from N random starts (y0: (B * N, P, V), or drawn) about each of the last P positions of a context;
        several think with the paper's inference noise (the softmax all but erases their starts). thinking: steps,
        step_size, tolerance. Returns ys (B, N, P, V), energies (B, N, P) (steps_used if adaptive)."""
        B, N = context[0][0].shape[0], candidates
        if N > 1:  # a view, not a copy: every candidate reads the same keys and values
            context = [tuple(t[:, None].expand(B, N, *t.shape[1:]).flatten(0, 1) for t in kv) for kv in context]
        y0 = self.initial_logits(B * N, P, context[0][0].device, generator) if y0 is None else y0
        noise = (VERIFY_LANGEVIN_STD if N > 1 else 0.0) if langevin_std is None else langevin_std
        traj = self.think(lambda p, k: self.energy(p, context, k, filled), y0, langevin_std=noise, **thinking)
        per_candidate = lambda t: t if t is None else t.unflatten(0, (B, N))
        return Trajectory([per_candidate(y) for y in traj.ys], [per_candidate(e) for e in traj.energies],
                          per_candidate(traj.steps_used))

    def next_token(self, idx, cache, generator=None, candidates=1, **thinking):
        """One step of generation: add idx (B, T_new) to the KVCache (None: idx is the whole window), think about
        the next token (a prediction token per candidate against its keys) and keep the candidate with the
        lowest final energy (self-verification). Returns the kept logits (B, V) and diagnostics."""
        # drawn first: the compiler cannot trace the generator, so a compiled token breaks here only
        y0 = self.initial_logits(len(idx) * candidates, 1, idx.device, generator)
        context, filled = self.context(idx, cache), None if cache is None else cache.filled
        traj = self.think_candidates(context, 1, candidates, y0=y0, filled=filled, **thinking)
        final = traj.energies[-1]  # (B, N, 1)
        used = traj.steps_used if traj.steps_used is not None else torch.full_like(final, len(traj.ys) - 1,
                                                                                    dtype=torch.long)
        diagnostics = {"energy": keep_lowest(final, final)[:, 0],                                   # (B,)
                       "candidate_energy": final[..., 0],                                           # (B, N)
                       "steps_used": keep_lowest(used, final)[:, 0],                                # (B,)
                       "trajectory": keep_lowest(torch.stack(traj.energies, -1), final)[:, 0]}      # (B, K+1)
        return keep_lowest(traj.ys[-1], final)[:, 0], diagnostics


def keep_lowest(x, final_energy):
    """Self-verification: from x (B, N, P, ...), at every position the candidate of lowest final energy."""
    best = final_energy.nan_to_num(nan=float("inf")).argmin(1, keepdim=True)  # (B, 1, P), never a NaN one
    return torch.take_along_dim(x, best.reshape(best.shape + (1,) * (x.dim() - 3)), dim=1).squeeze(1)


class ReplayBuffer:
    """The paper's S2 replay buffer (model/replay_buffer.py, mcmc_replay_buffer): the final logits of the last `size`
    training sequences, replayed as starts so that training sees longer descents than it pays for; per process."""

    def __init__(self, size):
        self.size, self.kept = size, {}  # "idx", "targets" (N, S) and "logits" (N, S, V)

    def extend(self, idx, targets, y0, n):
        """The batch and up to n stored sequences (drawn by torch's generator), starting where they ended."""
        n = min(n, len(self.kept.get("idx", ())))
        if n == 0:
            return idx, targets, y0
        pick = torch.randperm(len(self.kept["idx"]))[:n].to(idx.device)
        return tuple(torch.cat([t, self.kept[k][pick].to(t.dtype)]) for k, t in (("idx", idx), ("targets", targets),
                                                                                  ("logits", y0)))

    def add(self, idx, targets, logits):
        new = {"idx": idx, "targets": targets, "logits": logits.detach()}
        self.kept = {k: (torch.cat([self.kept[k], t]) if self.kept else t)[-self.size:] for k, t in new.items()}


class Transformer(nn.Module):
    """The Transformer++ baseline: the same blocks, ordinary next-token prediction."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.model == "transformer"
        self.config = cfg
        self.trunk = CausalTransformer(cfg)
        self.norm = RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.apply(init_weights)

    def logits(self, idx, cache=None):
        h, kvs = self.trunk(idx, cache)
        return self.lm_head(self.norm(h)), kvs  # (B, T, V)

    def next_token(self, idx, cache, generator=None):
        """Logits (B, V) of the token after idx (B, T_new), added to the KVCache (None: idx is the whole window)."""
        return self.logits(idx, cache)[0][:, -1], {}

    def forward(self, idx, targets):
        loss = cross_entropy(self.logits(idx)[0], targets)
        return loss, {"loss": loss.detach()}


MODELS = {"ebt": TextEBT, "transformer": Transformer}  # kind -> class; image_models.py adds the image models


def build_model(cfg, seed=None):
    """seed: makes the initial weights repeatable (training seeds its own batches and noise)."""
    if cfg.model not in MODELS:
        raise UsageError(f"model {cfg.model!r} is defined in image_models.py; import it first")
    if seed is not None:
        torch.manual_seed(seed)
    return MODELS[cfg.model](cfg)


# -----------------------------------------------------------------------------
# 5. The training loop

def train(model, data, tc, run=None):
    """AdamW with warm-up and cosine decay, clipping and gradient accumulation, for every model; evaluation and
    checkpoints go through run (Run: one process that keeps nothing). Batches and noise are functions of (seed,
    step), so a resumed run goes on exactly as a straight one would. Returns the records it logged."""
    run, device, thinks = run or Run(), best_device(tc.device), isinstance(model, Thinker)
    model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(0.9, 0.95),
                                  fused=device.startswith("cuda"))
    saved, best = run.restore(model, optimizer, device) if run.resume else (None, math.inf)  # the checkpoint's step
    step, nonfinite = saved or 0, torch.zeros((), dtype=torch.bool, device=device)
    run.share_weights(model)  # rank 0's
    run.log({"kind": "start", "step": step, "max_steps": tc.max_steps, "resumed": run.resume, "out_dir": tc.out_dir,
             "model": model.config.model, "parameters": sum(p.numel() for p in model.parameters()), "device": device,
             "world": run.world, "tokens_per_step": tc.batch_size * tc.grad_accum * run.world * data.tokens_per_sample})
    try:
        with run.listening():  # to a stop signal (Ctrl-C, SIGTERM): training ends after the step, saved
            while step < tc.max_steps and not run.stop_requested():
                lr = lr_at(step, tc)
                for param_group in optimizer.param_groups:
                    param_group["lr"] = lr * param_group["lr_mult"]
                # one step count per optimizer step, the same on every rank and micro-step
                steps = model.draw_steps(random.Random(batch_seed(tc.seed, step, -1))) if thinks else None
                for micro in range(tc.grad_accum):
                    g = torch.Generator().manual_seed(batch_seed(tc.seed, step, micro))
                    x, y = (t.to(device) for t in run.own_part(data.batch("train", tc.batch_size * run.world, g)))
                    torch.manual_seed(batch_seed(tc.seed, step, micro) + run.rank)  # thinking noise, replay picks
                    with autocast(device):
                        if thinks:  # an EBT backpropagates one thinking step at a time
                            metrics = model.learn(x, y, 1 / tc.grad_accum, steps)
                        else:
                            loss, metrics = model(x, y)
                            (loss / tc.grad_accum).backward()
                    nonfinite |= ~torch.isfinite(metrics["loss"])  # kept on the device, read when logging
                run.average_gradients(model)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
                nonfinite |= ~torch.isfinite(grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                logging = step % tc.log_interval == 0 or step in (1, tc.max_steps)  # 1: no long silence
                evaluating = step % tc.eval_interval == 0 or step == tc.max_steps
                if (logging or evaluating) and run.any(nonfinite):
                    raise non_finite("the loss or the gradient", step, saved, run)
                if logging:
                    metrics["loss"] = run.mean(metrics["loss"])  # over the global batch
                    cuda = device.startswith("cuda")
                    memory = {"peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20} if cuda else {}
                    run.log({"kind": "train", "step": step, "lr": lr, "grad_norm": grad_norm.item(), **memory,
                             **{k: v.item() for k, v in metrics.items()}})
                if evaluating:  # by rank 0; a checkpoint only of weights whose validation loss is finite
                    m = evaluate(model, data, tc, device) if run.rank == 0 else None
                    if run.any(m is not None and not math.isfinite(m["loss"])):
                        raise non_finite("the validation loss", step, saved, run)
                    new_best = m is not None and m["loss"] < best
                    best = m["loss"] if new_best else best
                    run.log({"kind": "eval", "step": step, **(m or {})})
                    saved = run.save(model, optimizer, tc, {"step": step, "best_loss": best}, new_best) or saved
                    run.log({"kind": "saved", "step": step})  # throughput counts training only
    except KeyboardInterrupt:  # at once (a second Ctrl-C): a lone process keeps the step it had reached
        interrupted(model, optimizer, tc, run, step, best, saved, save=run.world == 1 and not nonfinite)
    if step < tc.max_steps:  # a stop signal: every rank ends after the same step
        interrupted(model, optimizer, tc, run, step, best, saved, save=not nonfinite)
    return run.records


def interrupted(model, optimizer, tc, run, step, best, saved, save):
    """Keep the run at this step (unless kept already, or not to be kept), say so, and stop (exit code 130)."""
    if save and saved != step:
        saved = run.save(model, optimizer, tc, {"step": step, "best_loss": best}) or saved
    run.log({"kind": "message", "step": step, "text": f"interrupted at step {step}; " + (
        f"saved {run.checkpoint} (continue with --resume)" if saved == step else "not saved")})
    raise KeyboardInterrupt


class Run:
    """Where train() runs: here one process that prints what train() logs and keeps no files. The drivers' rundir.Run
    adds the processes of a data-parallel run (torchrun), the run's folder (checkpoints, log) and stop signals."""
    rank, world, resume, checkpoint = 0, 1, False, None
    listening = staticmethod(contextlib.nullcontext)  # to a stop signal (Ctrl-C, SIGTERM)
    stop_requested = staticmethod(lambda: False)  # by a signal, on any process
    any = staticmethod(bool)  # whether a flag holds on any process, so that every process decides alike
    own_part = mean = staticmethod(lambda t: t)  # this process's part of a global batch; a mean over processes
    share_weights = average_gradients = staticmethod(lambda model: None)  # rank 0's weights; the mean gradient
    show = staticmethod(print)  # a record train() logs

    def __init__(self):
        self.records = []

    def log(self, record):
        """Keep a record of what train() did (rank 0's), with its time, and show it."""
        if self.rank == 0:
            self.records.append({**record, "time": time.time()})
            self.show(self.records[-1])

    def save(self, model, optimizer, tc, record, new_best=False):
        """Keep the run at record["step"] (returned; None: not kept); new_best: its lowest validation loss yet."""

    def restore(self, model, optimizer, device):
        raise UsageError("this run keeps no checkpoint to resume from; give train() a rundir.Run")


def best_device(name="auto"):
    """The device to run on: as named, or for "auto" cuda, then mps, then cpu."""
    auto = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return auto if name == "auto" else name


def autocast(device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    return torch.autocast(str(device).split(":")[0], dtype=torch.bfloat16, enabled=str(device).startswith("cuda"))


def param_groups(model, weight_decay):
    """AdamW groups: decay for matrices, not gains; an EBT's step size: own learning rate, no decay."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rest = [p for n, p in named if n != "raw_step_size"]
    alpha = [{"params": [p], "weight_decay": 0.0, "lr_mult": model.config.step_size_lr_mult}
             for n, p in named if n == "raw_step_size"]
    return [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay, "lr_mult": 1.0},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_mult": 1.0}, *alpha]


def lr_at(step, tc):
    """Linear warm-up, then cosine decay to lr/10."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    return tc.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def batch_seed(seed, step, micro_step):
    """Training's randomness is a function of (seed, step): a resumed run draws what a straight one would."""
    return seed + 1_000_003 * step + 7919 * micro_step


# -----------------------------------------------------------------------------
# 6. Generation and evaluation

@torch.no_grad()
def evaluate(model, data, tc, device):
    """Mean validation metrics on fixed batches and starting noise. An EBT thinks tc.eval_steps (default
    THINK_LONGER x the trained steps); its "loss" (and "psnr") is the one after the trained steps."""
    model.eval()
    g = torch.Generator().manual_seed(tc.seed + 1)
    thinks = isinstance(model, Thinker)
    thinking = {"steps": tc.eval_steps or THINK_LONGER * model.trained_steps(), "generator": g} if thinks else {}
    totals = {}
    for _ in range(tc.eval_batches):
        x, y = data.batch("val", tc.batch_size, generator=g)
        with autocast(device):
            _, m = model(x.to(device), y.to(device), **thinking)
        for k, v in m.items():
            totals[k] = totals.get(k, 0) + v.double()
    model.train()
    m = {k: (v / tc.eval_batches).tolist() for k, v in totals.items()}
    if thinks:  # "loss" and "psnr" after the trained steps
        trained = m["trained_steps"] = min(model.trained_steps(), len(m["loss_per_step"]))
        m.update({k.removesuffix("_per_step"): v[trained - 1] for k, v in list(m.items()) if k.endswith("_per_step")})
    return m


@dataclass
class Generation:
    """What generate() produced, per new token; the thinking is an EBT's (None for the Transformer++)."""
    idx: torch.Tensor                      # (B, T0 + n) the prompt followed by the n new tokens
    logits: torch.Tensor                   # (B, n, V) the refined logits each token was sampled from
    energy: torch.Tensor = None            # (B, n) final energy of the kept candidate: low = confident
    candidate_energy: torch.Tensor = None  # (B, n, N) final energy of every candidate
    steps_used: torch.Tensor = None        # (B, n) descent steps the kept candidate took
    trajectory: list = None                # n tensors (B, K+1): the kept candidate's energy along its steps


def sample_next(logits, temperature=1.0, top_k=None, generator=None):
    """Next token ids (B, 1) from softmax(logits / temperature) over the top_k tokens; temperature 0: the argmax."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # inverse CDF with a uniform from the (CPU) generator: repeatable, and the host never waits
    u = torch.rand(logits.shape[0], 1, generator=generator).to(logits.device, non_blocking=True)
    cdf = logits.float().softmax(-1).cumsum(-1)
    return (cdf < u * cdf[:, -1:]).sum(-1, keepdim=True).clamp(max=logits.shape[-1] - 1)


@torch.no_grad()
def generate(model, idx, num_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True, on_token=None,
             **thinking):
    """Sample num_tokens tokens after the prompt idx (B, T0) with either text model (in eval mode). A KV
    cache of the context stream makes a token cost one token through the trunk and, for an EBT, the
    thinking of one prediction token per candidate. The window holds at most block_size tokens, then
    restarts from the last block_size // 2; use_cache=False recomputes it for every token (the same
    result). thinking (EBTs): candidates, steps, step_size, langevin_std, tolerance. on_token(idx): each new token."""
    if thinking and not isinstance(model, TextEBT):
        raise UsageError(f"thinking ({', '.join(thinking)}) needs an EBT; this is a {model.config.model!r} model")
    check_generate(model, idx, dict(thinking, num_tokens=num_tokens, temperature=temperature, top_k=top_k))
    block, keep = model.config.block_size, max(1, model.config.block_size // 2)
    start, seen, per_token = max(0, idx.shape[1] - block), 0, []  # the window is idx[:, start:], seen of it cached
    cache = KVCache(model, len(idx), idx.device) if use_cache else None
    for n in range(1, num_tokens + 1):
        if idx.shape[1] - start > block:  # the window restarts from its last `keep` tokens
            start, seen = idx.shape[1] - keep, 0
            if cache is not None:
                cache.filled.zero_()  # in place: a compiled token keeps reading the same tensor
        logits, diagnostics = model.next_token(idx[:, start + seen:], cache, generator, **thinking)
        seen = idx.shape[1] - start if use_cache else 0
        per_token.append((logits, diagnostics))
        chosen = logits if getattr(model, "padded", None) is None else logits.masked_fill(model.padded, -math.inf)
        idx = torch.cat([idx, sample_next(chosen, temperature, top_k, generator)], dim=1)
        if on_token is not None:
            on_token(idx)
    out = Generation(idx, torch.stack([logits for logits, _ in per_token], 1) if per_token else None)
    if per_token and per_token[0][1]:
        stack = lambda name: torch.stack([d[name] for _, d in per_token], 1)
        out.energy, out.candidate_energy, out.steps_used = (stack(k) for k in ("energy", "candidate_energy", "steps_used"))
        out.trajectory = [d["trajectory"] for _, d in per_token]
    return out
