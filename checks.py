"""
The errors a user can fix, and the checks that raise them: the drivers print each as one line (exit code 2).
ebt.py's configs and generate() call these; a reader of EBTs need not open this file.
"""
import math
from dataclasses import fields

import torch


class UsageError(Exception):
    """A problem with the user's input: the drivers report it in one line, exit code 2."""


class ConfigError(UsageError, ValueError):
    """An impossible configuration value or argument of the public API, naming it: where.name=value: why."""

    def __init__(self, where, name, why, value=None):
        self.name, self.value, self.why = name, getattr(where, name, value), why
        super().__init__(f"{where if isinstance(where, str) else type(where).__name__}.{name}={self.value!r}: {why}")


def check_values(where, values, limits):
    """A ConfigError naming the first of values (name -> value) not of its type (an int takes no float, a float takes
    an int, only a bool a bool) or, for a number, not finite in least..most. limits: name -> (type, least, most)."""
    for name, v in values.items():
        kind, least, most = limits[name]
        if not isinstance(v, (int, float) if kind is float else kind) or isinstance(v, bool) != (kind is bool):
            raise ConfigError(where, name, f"must be of type {kind.__name__}", v)
        if kind in (int, float) and not (least <= v <= most and v != math.inf):  # NaN fails the comparisons
            show = lambda x: f"{x:,}" if isinstance(x, int) else f"{x:g}"
            why = f">= {show(least)}" if most == math.inf else f"in {show(least)}..{show(most)}"
            raise ConfigError(where, name, f"must be {'finite and ' * (kind is float)}{why}", v)


def check_fields(config):
    """Each field of a config of its type and within its option's limits (its definition's option())."""
    check_values(config, {f.name: getattr(config, f.name) for f in fields(config)},
                 {f.name: (f.type, *f.metadata["limits"]) for f in fields(config)})


def check(config, name, ok, why):
    if not ok:
        raise ConfigError(config, name, why)


MAX_THINK_STEPS = 64  # in training each step is a second-order forward and backward


def check_model_config(cfg, text_kinds, image_kinds):
    """A ModelConfig's fields, each of its type and range, and how they relate."""
    check_fields(cfg)
    c = lambda name, ok, why: check(cfg, name, ok, why)
    c("model", cfg.model in text_kinds + image_kinds, f"must be one of {text_kinds + image_kinds}")
    c("n_embd", cfg.n_embd % cfg.n_head == 0, f"must be divisible by n_head={cfg.n_head}")
    c("n_embd", cfg.model not in text_kinds or cfg.n_embd // cfg.n_head % 2 == 0, "head size must be even")
    c("image_size", cfg.image_size % cfg.patch_size == 0, f"must be a multiple of patch_size={cfg.patch_size}")
    c("think_steps", cfg.think_steps + cfg.random_steps <= MAX_THINK_STEPS,
      f"think_steps + random_steps must be <= {MAX_THINK_STEPS} in training")
    c("landscapes", cfg.landscapes <= cfg.think_steps + cfg.random_steps, "must be <= the steps trained")
    c("step_size", cfg.step_size > 0, "must be > 0")


def check_train_config(tc):
    check_fields(tc)
    check(tc, "lr", tc.lr > 0, "must be > 0")


# ebt.generate()'s arguments, and sample.py's flags: (type, least, most)
SAMPLING_LIMITS = {"num_tokens": (int, 0, 10**7), "temperature": (float, 0, math.inf), "top_k": (int, 1, math.inf),
                   "candidates": (int, 1, 4096), "steps": (int, 1, 10_000), "step_size": (float, 1e-9, 1e6),
                   "langevin_std": (float, 0, 1e3), "tolerance": (float, 0, math.inf)}


def check_generate(model, idx, arguments):
    """generate()'s arguments within SAMPLING_LIMITS, and idx a (B, T) tensor of the model's ids."""
    check_values("generate", {k: v for k, v in arguments.items() if k in SAMPLING_LIMITS and v is not None},
                 SAMPLING_LIMITS)
    V, ids = model.config.vocab_size, torch.is_tensor(idx) and idx.dim() == 2 and idx.dtype in (torch.long, torch.int)
    if not (ids and idx.numel() and 0 <= idx.min() and idx.max() < V):
        raise ConfigError("generate", "idx", f"must be a (B, T) int64 tensor of ids in 0..{V - 1}, B and T >= 1",
                          f"ids {idx.min()}..{idx.max()}" if ids and idx.numel() else getattr(idx, "shape", idx))


def non_finite(what, step, saved, run):
    """train()'s stop when the loss or the gradient is no longer finite, naming the last good checkpoint."""
    return UsageError(f"training stopped: {what} became NaN or infinite by step {step}; " + (
        f"the last good checkpoint is {run.checkpoint} (step {saved})" if saved is not None else
        "no checkpoint was written yet") + "; try a lower --lr")
