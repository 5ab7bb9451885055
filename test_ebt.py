"""nanoEBT tests. Run: python -m pytest -q test_ebt.py  (7 to 10 minutes on 2 CPU cores, no network).

By concern: blocks and attention, the descent, training, generation, torch.compile, flags and configuration,
resume and checkpoints, run folders and stopping, text data, the drivers, bench and results, bad input, images,
data parallel. -m "not slow" leaves out the compiled and multi-process tests; -m cuda runs the GPU ones.
"""
import contextlib
import copy
import dataclasses
import errno
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import types
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ["NANOEBT_CACHE"] = tempfile.mkdtemp(prefix="nanoebt-cache-")  # text files prepared here, not in data/
import checks
import cli
import compiled
import ebt
import image_models
import measure
import plots
import rundir
import sample
import train_image
import train_text
from data import images, prepare
from data.text import CharTokenizer, GPT2Tokenizer, SHAKESPEARE, TextData, random_windows

HERE = Path(__file__).resolve().parent
CUDA = [pytest.param("cuda", marks=[pytest.mark.cuda,
                                    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]
torch.set_num_threads(1)  # tiny models: threads cost more than they give

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away"]


def synthetic_text(n_words=6000, seed=0):
    """Random words from a small list: characters inside a word are predictable, so a model that
    learns drops far below the unigram entropy."""
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(len(WORDS), (n_words,), generator=g).tolist()) + "\n"


VOCAB = len(set(synthetic_text()))
S2 = {**ebt.RECIPES["s2"], "step_size": 0.5, "step_size_lr_mult": 1.0, "langevin_std": 0.3,
      "replay_size": 8}  # the paper's S2, with a step and noise the tiny float64 models' numbers keep meaningful
TINY = ["--preset", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16",
        "--batch_size", "4", "--max_steps", "4", "--eval_interval", "2", "--eval_batches", "1", "--log_interval", "1",
        "--device", "cpu"]  # train_text.py at the smallest size
TINY_IMAGE = ["--image_size", "16", "--n_layer", "1", "--n_embd", "32", "--max_steps", "4", "--eval_interval", "4",
              "--eval_batches", "1", "--batch_size", "4", "--report_steps", "3", "--passes", "1", "3",
              "--device", "cpu", "--dataset", "grace_hopper"]  # the smallest size; matplotlib's photo: no scikit-image


def config(**kw):
    return ebt.ModelConfig(**{**dict(model="ebt", vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=32), **kw})


def tiny(seed=0, weights=None, **kw):
    """The tests' tiny model (config(**kw)) in float64, with rotary tables computed in float64: training's
    attention scores a prediction's own key unrotated, which equals the rotated score as far as
    cos^2 + sin^2 = 1, to about 1e-7 with float32 tables and 1e-16 with these. weights=std redraws the
    matrices from N(0, std^2), larger than at init, so that every path matters numerically."""
    model = ebt.build_model(config(**kw), seed=seed).double()
    if model.config.model in ebt.TEXT_KINDS:
        rotary = model.trunk.rotary
        P, Dh = rotary.cos.shape
        angles = torch.arange(P, dtype=torch.float64)[:, None] * 10000.0 ** -(torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
        rotary.cos, rotary.sin = torch.cat([angles.cos(), angles.cos()], -1), torch.cat([-angles.sin(), angles.sin()], -1)
    if weights:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, weights)
    return model


def predict(model, idx, steps=None, y0=None, generator=None, **thinking):
    """A text EBT thinking at every position of idx (B, T): the Trajectory of (B, T, V) logits."""
    context = model.context(idx)
    y0 = model.initial_logits(*idx.shape, idx.device, generator) if y0 is None else y0
    return model.think(lambda p, k: model.energy(p, context, k), y0, steps, **thinking)


def unigram_entropy(text):
    counts = torch.tensor([text.count(c) for c in sorted(set(text))], dtype=torch.float64)
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


def words_data(block_size=16):
    tok = CharTokenizer(sorted(set(synthetic_text())))
    ids = np.array(tok.encode(synthetic_text()))
    n_val = len(ids) // 10  # the last tenth validates, as data/prepare.py splits
    return tok, TextData(ids[:len(ids) - n_val], ids[len(ids) - n_val:], block_size)


def train_config(tmp_path, **kw):
    return ebt.TrainConfig(**{**dict(max_steps=6, batch_size=8, lr=3e-3, warmup_steps=2, eval_interval=3,
                                     eval_batches=2, log_interval=1, out_dir=str(tmp_path / "out"), device="cpu",
                                     seed=0), **kw})


quiet = lambda *a: None


class Silent(ebt.Run):
    """train() in one process, keeping nothing and saying nothing."""
    def show(self, record):
        pass


def run_script(*args, cwd=HERE):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def run_cli(main, *argv):
    """A driver run in this process the way its __main__ runs it: (exit code, stdout, stderr)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.invoke(lambda: main(list(argv)))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text(synthetic_text())
    return path


# -----------------------------------------------------------------------------
# Blocks and attention

def test_the_prediction_token_carries_its_candidate_at_initialisation():
    """p @ W averages rows of W, so with std-0.02 weights a std-0.02 step embedding had 4.6x its RMS
    (V=65): the candidate was drowned. Now the step embedding starts at zero and W is xavier-normal,
    and the energy moves when the candidate does."""
    model = ebt.build_model(ebt.ModelConfig(vocab_size=65, n_layer=4, n_head=4, n_embd=128, block_size=64), seed=0)
    p = torch.randn(8, 64, 65).softmax(-1)
    assert model.step_emb.weight.abs().max() == 0
    assert model.pred_emb(p).pow(2).mean().sqrt() > 0.01
    context = model.context(torch.randint(65, (8, 64)))
    e1, e2 = model.energy(p, context, 0), model.energy(torch.randn(8, 64, 65).softmax(-1), context, 0)
    assert (e1 - e2).std() > 0.05 * e1.std()


def energies(model, idx, logits, step=0):
    return model.energy(logits.softmax(-1), model.context(idx), step)


@pytest.mark.parametrize("training", [True, False])  # explicit attention / fused kernel
def test_energy_of_prediction_ignores_future_context_and_other_predictions(training):
    model = tiny(weights=0.3).train(training)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(13, (2, 16), generator=g)
    logits = torch.randn(2, 16, 13, generator=g, dtype=torch.float64)
    base = energies(model, idx, logits)
    for i in (0, 5, 15):
        later = idx.clone()
        later[:, i + 1:] = torch.randint(13, later[:, i + 1:].shape, generator=g)
        others = logits.clone()
        others[:, torch.arange(16) != i] = torch.randn(2, 15, 13, generator=g, dtype=torch.float64)
        torch.testing.assert_close(energies(model, later, logits)[:, :i + 1], base[:, :i + 1], rtol=0, atol=1e-12)
        torch.testing.assert_close(energies(model, idx, others)[:, i], base[:, i], rtol=0, atol=1e-12)
    # and the test can fail: earlier context and the prediction itself do matter
    changed = idx.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 13
    assert (energies(model, changed, logits) - base).abs().min() > 1e-9
    assert (energies(model, idx, logits.flip(-1)) - base).abs().min() > 1e-9


def full_attention_energy(model, idx, logits, step=0):
    """Reference: both streams (2S tokens) through every block in one attention with an explicit
    2S x 2S mask, rotary applied by hand. No cache, no split attention."""
    B, S = idx.shape
    H = model.config.n_head
    x = torch.cat([model.trunk.tok_emb(idx), model.pred_emb(logits.softmax(-1)) + model.step_emb.weight[step]], 1)
    i = torch.arange(S)
    sees = i[None, :] <= i[:, None]
    mask = torch.zeros(2 * S, 2 * S, dtype=torch.bool)
    mask[:S, :S] = sees                  # context: causal
    mask[S:, :S] = sees                  # prediction i: context 0..i
    mask[S:, S:] = torch.eye(S, dtype=torch.bool)  # ... and itself
    pos = torch.cat([i, i + 1])          # prediction i stands for token i+1
    half = model.config.n_embd // model.config.n_head // 2
    cos, sin = model.trunk.rotary.cos[pos, :half], model.trunk.rotary.sin[pos, half:]

    def rotate(t):
        a, b = t.chunk(2, -1)
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    for block in model.trunk.blocks:
        q, k, v = block.attn.qkv(block.attn_norm(x)).view(B, 2 * S, 3, H, -1).permute(2, 0, 3, 1, 4)
        q, k = rotate(q), rotate(k)
        att = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + block.attn.proj((att @ v).transpose(1, 2).reshape(B, 2 * S, -1))
        x = x + block.mlp(block.mlp_norm(x))
    return model.energy_head(model.norm(x[:, S:])).squeeze(-1)


@pytest.mark.parametrize("training", [True, False])  # explicit attention / fused kernel
def test_cached_context_matches_full_two_stream_attention(training):
    model = tiny(weights=0.3).train(training)
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(13, (3, 16), generator=g)
    logits = torch.randn(3, 16, 13, generator=g, dtype=torch.float64, requires_grad=True)
    for step in (0, 1):
        e_cached, e_full = energies(model, idx, logits, step), full_attention_energy(model, idx, logits, step)
        torch.testing.assert_close(e_cached, e_full, rtol=1e-10, atol=1e-10)
        (g_cached,) = torch.autograd.grad(e_cached.sum(), logits)
        (g_full,) = torch.autograd.grad(e_full.sum(), logits)
        torch.testing.assert_close(g_cached, g_full, rtol=1e-10, atol=1e-12)
        assert g_full.abs().max() > 1e-6


def test_bidirectional_attention_explicit_matches_fused():
    attn = ebt.Attention(image_config())
    x = torch.randn(2, 16, 64)
    torch.testing.assert_close(image_models.attend_all(attn, x, True), image_models.attend_all(attn, x, False), rtol=0, atol=1e-5)
    x.requires_grad_()  # not causal: the first token depends on the last
    (grad,) = torch.autograd.grad(image_models.attend_all(attn, x, True)[:, 0].sum(), x)
    assert grad[:, -1].abs().sum() > 0


# -----------------------------------------------------------------------------
# The descent

def test_thinking_starts_from_normal_logits_of_init_std():
    model = ebt.build_model(config(init_std=2.0), seed=0)
    assert model.initial_logits(64, 16, "cpu").std().item() == pytest.approx(2.0, rel=0.05)


def test_text_step_is_the_papers_step_in_probability_space_by_finite_differences():
    """y1 = p - alpha * dE/dp with p = softmax(y0) (model/nlp/ebt.py, normalize_initial_condition): the
    gradient by central differences of the energy in each probability, not by autograd."""
    model = tiny(n_layer=1, weights=0.3).eval()
    g = torch.Generator().manual_seed(8)
    idx = torch.randint(13, (1, 5), generator=g)
    y0 = torch.randn(1, 5, 13, generator=g, dtype=torch.float64)
    alpha = 0.7
    y1 = predict(model, idx, steps=1, y0=y0, step_size=alpha).ys[1]
    context, p, h = model.context(idx), y0.softmax(-1), 1e-6
    with torch.no_grad():
        grad = torch.zeros_like(p)
        for v in range(13):
            bump = torch.zeros_like(p)
            bump[..., v] = h
            grad[..., v] = (model.energy(p + bump, context, 0) - model.energy(p - bump, context, 0)) / (2 * h)
    torch.testing.assert_close(y1, p - alpha * grad, rtol=0, atol=1e-7)
    assert (y1 - (y0 - alpha * grad)).abs().max() > 1e-3  # a step on the old logits would differ


def test_langevin_noise_goes_on_the_logits_before_every_step():
    """With a flat energy the step is only the noise: y_k+1 = softmax(y_k + noise_k) (the paper's code
    adds the noise to the logits, then normalises)."""
    flat = lambda p, k: 0.0 * p.sum(-1)
    y0 = torch.randn(2, 3, 5, dtype=torch.float64)
    torch.manual_seed(11)
    ys = ebt.think(flat, y0, 2, 1.0, normalize=lambda y: y.softmax(-1), langevin_std=3.0).ys
    torch.manual_seed(11)
    y1 = (y0 + 3.0 * torch.randn_like(y0)).softmax(-1)
    y2 = (y1 + 3.0 * torch.randn_like(y1)).softmax(-1)
    torch.testing.assert_close(ys[1], y1)
    torch.testing.assert_close(ys[2], y2)


class Quadratic(ebt.Thinker, torch.nn.Module):
    """A thinker whose energy is 0.5 |x|^2 per token: each step is y <- (1 - alpha) y, so the y's
    show the step size every token took."""
    energy_ndim = 2

    def __init__(self, **kw):
        super().__init__()
        self.config = config(**kw)
        self.raw_step_size = torch.nn.Parameter(torch.tensor(float(self.config.step_size)))

    def energy(self, x, landscape):
        return 0.5 * x.pow(2).sum(-1)


def test_random_step_size_is_drawn_per_token_within_half_to_twice_alpha():
    model = Quadratic(step_size=2.0, random_step_size=2.0).train()
    torch.manual_seed(0)
    x0 = torch.randn(40, 50, 5, dtype=torch.float64) + 3
    ys = model.think(model.energy, x0, 2).ys
    alpha = 1 - ys[1] / x0  # per entry
    assert torch.allclose(alpha, alpha[..., :1].expand_as(alpha))  # one per token ...
    assert alpha[..., 0].std() > 0.2 and alpha[0, :, 0].std() > 0.2  # ... and tokens of one sequence differ
    assert alpha.min() >= 1.0 - 1e-12 and alpha.max() <= 4.0 + 1e-12  # alpha x U[1/2, 2], all of it:
    assert alpha.min() < 1.05 and alpha.max() > 3.9 and abs(alpha.mean() - 2.5) < 0.05
    torch.testing.assert_close(ys[2] / x0, (1 - alpha) ** 2)  # the same factor at the second step
    ys = model.eval().think(model.energy, x0, 1).ys  # at inference alpha is as learned
    torch.testing.assert_close(ys[1], (1 - 2.0) * x0)


def test_adaptive_stopping_compares_energies_on_the_same_landscape():
    """A second landscape 10 lower than the first: comparing E_0(y_0) with E_1(y_1) would see a drop of
    10 and go on; the step itself hardly lowered the energy, so the position stops."""
    energy = lambda x, k: 0.5 * x.pow(2).sum(-1) - 10.0 * min(k, 1)
    y0 = torch.full((1, 2, 3), 1e-3, dtype=torch.float64)
    traj = ebt.think_adaptively(energy, y0, 5, 0.1, 1e-4)
    assert traj.steps_used.tolist() == [[1, 1]] and len(traj.ys) == 2
    torch.testing.assert_close(traj.energies[-1], energy(traj.ys[-1], 0))  # on the last step's landscape
    # without a tolerance the same thinking runs all its steps
    assert len(ebt.think(energy, y0, 5, 0.1).ys) == 6


def test_adaptive_stopping_spends_fewer_steps_on_a_converged_position():
    model = tiny(landscapes=1, step_size=0.5).eval()
    context = model.context(torch.randint(13, (1, 2), generator=torch.Generator().manual_seed(1)))
    energy = lambda p, k: model.energy(p, context, k)
    y0 = model.initial_logits(1, 2, "cpu", torch.Generator().manual_seed(2))
    converged = model.think(energy, y0, 60).ys[-1]
    start = torch.stack([converged[0, 0], y0[0, 1]])[None]  # position 0 converged, position 1 fresh
    traj = model.think(energy, start, 20, tolerance=1e-6)
    assert traj.steps_used[0, 0] == 1 and traj.steps_used[0, 1] > 2
    torch.testing.assert_close(traj.ys[-1][0, 0], traj.ys[1][0, 0])  # a stopped position keeps its state
    traj = model.think(energy, converged, 20, tolerance=1e-6)
    assert len(traj.ys) == 2 and len(traj.energies) == 2  # thinking ended once every position had settled
    out = ebt.generate(model, start.new_zeros(1, 3, dtype=torch.long), 4, steps=20, tolerance=1e-6)
    assert ((1 <= out.steps_used) & (out.steps_used <= 20)).all()
    assert [len(t[0]) for t in out.trajectory] == (out.steps_used[0] + 1).tolist()


def test_step_size_below_its_clamp_still_gets_a_gradient():
    model = tiny()
    with torch.no_grad():
        model.raw_step_size.fill_(-1.0)
    assert model.step_size().item() == pytest.approx(1e-3)
    idx = torch.randint(13, (2, 16), generator=torch.Generator().manual_seed(5))
    model.train()(idx, idx)[0].backward()
    assert model.raw_step_size.grad.abs() > 0


# -----------------------------------------------------------------------------
# Training through the descent

def test_training_backpropagates_through_the_descent():
    model = tiny(weights=0.3)
    g = torch.Generator().manual_seed(4)
    idx, targets = torch.randint(13, (2, 16), generator=g), torch.randint(13, (2, 16), generator=g)
    model.learn(idx, targets, 1.0)
    assert model.raw_step_size.grad is not None and model.raw_step_size.grad.abs() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"

    # the second-order term is really there: without create_graph the energy model gets nothing
    context, grads = model.context(idx), {}
    y0 = torch.randn(2, 16, 13, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for create_graph in (True, False):
        model.zero_grad(set_to_none=True)
        traj = ebt.think(lambda p, k: model.energy(p, context, k), y0, 2, model.step_size(), normalize=model.normalize,
                         create_graph=create_graph)
        sum(ebt.cross_entropy(y, targets) for y in traj.ys[1:]).backward()
        grads[create_graph] = {n: p.grad for n, p in model.named_parameters()}
    blocks = [n for n in grads[True] if n.startswith("trunk.blocks")]
    assert all(grads[True][n] is not None and grads[True][n].abs().sum() > 0 for n in blocks)
    assert all(grads[False][n] is None or grads[False][n].abs().sum() == 0 for n in blocks)
    torch.testing.assert_close(grads[True]["raw_step_size"], grads[False]["raw_step_size"])  # first order either way


def hand_descent_loss(model, idx, targets, y0, steps, last_only, langevin_std=0.0, random_step_size=1.0):
    """The training loss through the descent, written out with plain autograd calls: S1 (detach between
    steps, a landscape per step, mean CE) or S2 (no detach, one landscape, only the last gradient keeps
    its graph, CE of the last step; alpha x U[1/s, s] per token, drawn first, then Langevin noise on the
    logits before each step), drawing from torch's global generator in the model's order."""
    context, alpha, y, losses = model.context(idx), model.step_size(), y0, []
    if random_step_size > 1:
        alpha = alpha * torch.empty(*y0.shape[:-1], 1, dtype=y0.dtype).uniform_(1 / random_step_size, random_step_size)
    for k in range(steps):
        if langevin_std:
            y = y + langevin_std * torch.randn_like(y)
        p = y.softmax(-1)
        if not last_only or not p.requires_grad:
            p = p.detach().requires_grad_()
        (grad,) = torch.autograd.grad(model.energy(p, context, 0 if last_only else k).sum(), p,
                                      create_graph=not last_only or k == steps - 1)
        y = p - alpha * grad
        losses.append(F.cross_entropy(y.flatten(0, 1), targets.flatten()))
    return losses[-1] if last_only else sum(losses) / steps


@pytest.mark.parametrize("recipe", ["s1", "s2"])
def test_training_gradients_match_the_descent_written_out_by_hand(recipe):
    s2 = recipe == "s2"
    model = tiny(weights=0.3, **(S2 if s2 else dict(step_size=0.5))).train()
    g = torch.Generator().manual_seed(9)
    idx, targets = torch.randint(13, (2, 16), generator=g), torch.randint(13, (2, 16), generator=g)
    steps = 3 if s2 else 2
    torch.manual_seed(5)
    loss, _ = model(idx, targets, steps=steps, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    y0 = model.initial_logits(2, 16, "cpu", torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    noise = dict(langevin_std=S2["langevin_std"], random_step_size=S2["random_step_size"]) if s2 else {}
    expected = hand_descent_loss(model, idx, targets, y0, steps, last_only=s2, **noise)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    hand = torch.autograd.grad(expected, params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), grads, hand):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


def gradients(model, learn, batch, seed=4):
    """Parameter gradients of one training batch: learn() (one thinking step at a time) or one backward
    of the loss forward() returns."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # Langevin noise, random step sizes
    if learn:
        model.learn(*batch, 1.0, steps=3, generator=torch.Generator().manual_seed(1))
    else:
        model(*batch, steps=3, generator=torch.Generator().manual_seed(1))[0].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recipe", ["s1", "s2", "chained"])
def test_one_step_at_a_time_backward_gives_the_single_backward_gradients(recipe):
    """chained (detach=False, every step trained): a later step's loss reaches back through the earlier
    steps, so learn() backpropagates the whole descent at the end."""
    kw = {"s1": dict(langevin_std=0.3, random_step_size=2.0), "s2": {**S2, "replay_size": 0},
          "chained": dict(langevin_std=0.3, detach=False)}[recipe]
    model = tiny(weights=0.3, **{"step_size": 0.5, **kw}).train()
    g = torch.Generator().manual_seed(6)
    batch = torch.randint(13, (3, 16), generator=g), torch.randint(13, (3, 16), generator=g)
    stepwise, single = gradients(model, True, batch), gradients(model, False, batch)
    assert stepwise.keys() == single.keys() and len(single) >= len(list(model.parameters())) - 1
    for n in single:
        torch.testing.assert_close(stepwise[n], single[n], rtol=1e-10, atol=1e-13, msg=n)


def test_a_step_is_backpropagated_with_no_earlier_state_alive(monkeypatch):
    """Each step's state is (B, S, V): at a GPT-2 vocabulary and batch 8 x 256 one kept too long is 411 MB
    at the peak. When the hand-off backpropagates step k, the state step k started from must be gone
    (a trajectory that listed it, even only while the hand-off ran, kept it)."""
    model, started_from = tiny(step_size=0.5).train(), []
    think = model.think

    def watched(*args, on_step, **kw):
        def hand_off(k, y):
            assert all(ref() is None for ref in started_from), f"step {k}: an earlier state is alive"
            state = on_step(k, y)
            started_from.append(weakref.ref(state))
            return state
        return think(*args, on_step=hand_off, **kw)
    monkeypatch.setattr(model, "think", watched)
    idx = torch.randint(13, (2, 16), generator=torch.Generator().manual_seed(5))
    model.learn(idx, idx, 1.0, steps=3)
    assert len(started_from) == 3


@pytest.mark.parametrize("device", ["cpu", *CUDA])
def test_gradgradcheck_of_one_thinking_step(device):
    """Training differentiates the descent step: its second derivatives (explicit attention, rotary,
    RMSNorm's double backward, SwiGLU) checked against finite differences."""
    model = tiny(n_layer=1, n_embd=8, n_head=2, vocab_size=5, block_size=4, step_size=0.5, detach=False,
                 weights=0.3).to(device).train()  # no detach: the step is a function of its start
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(5, (1, 3), generator=g).to(device)
    y0 = torch.randn(1, 3, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    one_step = lambda y: predict(model, idx, steps=1, y0=y).ys[1]
    assert torch.autograd.gradcheck(one_step, (y0,))
    assert torch.autograd.gradgradcheck(one_step, (y0,))


def test_replay_buffer_keeps_the_last_sequences_and_restarts_them_where_they_ended():
    buffer = ebt.ReplayBuffer(5)
    for i in range(3):  # batches of 2: tokens i, logits i
        buffer.add(torch.full((2, 4), i), torch.full((2, 4), i), torch.full((2, 4, 3), float(i)))
    assert buffer.kept["idx"][:, 0].tolist() == [0, 1, 1, 2, 2]  # the oldest sequence fell out
    small = ebt.ReplayBuffer(3)
    small.add(torch.arange(5)[:, None], torch.arange(5)[:, None], torch.zeros(5, 1, 2))
    assert small.kept["idx"][:, 0].tolist() == [2, 3, 4]  # a first batch larger than the buffer
    torch.manual_seed(0)
    idx, targets, y0 = buffer.extend(torch.full((2, 4), 9), torch.full((2, 4), 9), torch.zeros(2, 4, 3), 3)
    assert idx.shape == (5, 4) and (idx[:2] == 9).all()
    torch.testing.assert_close(y0[2:, 0, 0], idx[2:, 0].double().float())  # each starts from its own logits
    model = tiny(**{**S2, "replay_size": 6, "langevin_std": 0.0, "random_step_size": 1.0}).train()
    g = torch.Generator().manual_seed(5)
    x = torch.randint(13, (4, 16), generator=g)
    model.learn(x, x, 1.0, steps=3, generator=torch.Generator().manual_seed(9))  # empty buffer: the batch alone
    y0 = model.initial_logits(4, 16, "cpu", torch.Generator().manual_seed(9))
    final = predict(model.eval(), x, y0=y0).ys[-1]  # the same descent, at inference
    model.train()
    assert torch.equal(model.replay.kept["idx"], x) and not model.replay.kept["logits"].requires_grad
    torch.testing.assert_close(model.replay.kept["logits"], final, rtol=1e-9, atol=1e-9)  # where it ended
    for _ in range(2):  # now half a batch is replayed each time; only the fresh sequences are kept
        x = torch.randint(13, (4, 16), generator=g)
        metrics = model.learn(x, x, 1.0)
        assert torch.equal(model.replay.kept["idx"][-4:], x) and torch.isfinite(metrics["loss"])
    assert len(model.replay.kept["idx"]) == 6 and model.replay.kept["logits"].shape == (6, 16, 13)


@pytest.mark.parametrize("option", [dict(langevin_std=0.5), dict(random_step_size=2.0), dict(random_steps=2),
                                    dict(truncate=True), dict(detach=False)])
def test_each_system2_option_trains_the_blocks(option):
    model = tiny(**option)
    idx = torch.randint(13, (2, 16), generator=torch.Generator().manual_seed(5))
    metrics = model.learn(idx, idx, 1.0)
    assert math.isfinite(metrics["loss"]) and model.trunk.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_step_size_has_own_learning_rate_and_no_weight_decay():
    model = ebt.build_model(config())
    groups = ebt.param_groups(model, 0.1)
    (alpha_group,) = [g for g in groups if any(p is model.raw_step_size for p in g["params"])]
    assert alpha_group["weight_decay"] == 0 and alpha_group["lr_mult"] == model.config.step_size_lr_mult
    assert len(alpha_group["params"]) == 1 and sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 0.1 for g in groups if any(p.dim() >= 2 for p in g["params"]))


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_a_tenth():
    tc = ebt.TrainConfig(lr=1.0, warmup_steps=10, max_steps=110)
    assert ebt.lr_at(0, tc) == pytest.approx(0.1) and ebt.lr_at(9, tc) == pytest.approx(1.0)
    assert ebt.lr_at(10, tc) == pytest.approx(1.0) and ebt.lr_at(60, tc) == pytest.approx(0.55)  # halfway
    assert ebt.lr_at(110, tc) == pytest.approx(0.1) and ebt.lr_at(500, tc) == pytest.approx(0.1)


def test_the_step_count_is_drawn_once_per_optimizer_step(tmp_path):
    tok, data = words_data()
    model, seen = ebt.build_model(config(vocab_size=tok.vocab_size, random_steps=2)), []
    learn = model.learn
    model.learn = lambda x, y, weight, steps=None: seen.append(steps) or learn(x, y, weight, steps)
    ebt.train(model, data, train_config(tmp_path, max_steps=8, grad_accum=3), Silent())
    per_step = [seen[i:i + 3] for i in range(0, 24, 3)]
    assert all(len(set(s)) == 1 for s in per_step) and len({s[0] for s in per_step}) > 1, per_step
    assert {s[0] for s in per_step} <= {2, 3, 4}


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory):
    """A tiny EBT and a tiny Transformer++ trained on the synthetic words, same budget."""
    out = {}
    for kind in ("ebt", "transformer"):
        tok, data = words_data()
        tc = train_config(tmp_path_factory.mktemp(kind), max_steps=200, batch_size=16, warmup_steps=20,
                          eval_interval=200, eval_batches=4, log_interval=100)
        model = ebt.build_model(config(model=kind, vocab_size=tok.vocab_size, step_size=20.0))
        out[kind] = (model, data, ebt.train(model, data, tc, Silent()))
    return out


def test_ebt_and_transformer_learn_well_below_unigram_entropy(trained_models):
    floor = unigram_entropy(synthetic_text())
    for kind, (model, data, records) in trained_models.items():
        loss = [r for r in records if r["kind"] == "eval"][-1]["loss"]
        # the text's character-bigram entropy is 1.05 nats: below 0.75 needs more context than one character
        assert loss < 0.6 * floor and loss < 0.75, (kind, loss, floor)


def test_thinking_moves_the_random_start_to_the_answer(trained_models):
    """The prediction is made by the descent: the start is noise, the thought is the answer."""
    model, data, _ = trained_models["ebt"]
    x, y = data.batch("val", 16, generator=torch.Generator().manual_seed(0))
    ce = [ebt.cross_entropy(t, y).item() for t in predict(model.eval(), x).ys]
    model.train()
    assert ce[0] > math.log(model.config.vocab_size) and ce[-1] < 0.75, ce  # bigram entropy 1.05


@pytest.mark.parametrize("device", ["cpu", *CUDA])
def test_bf16_autocast_training_matches_fp32_and_descent_gradient_stays_finite(device):
    tok, data = words_data()
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = ebt.build_model(config(vocab_size=tok.vocab_size, step_size=20.0), seed=0).to(device)
        opt = torch.optim.AdamW(ebt.param_groups(model, 0.1), lr=3e-3)
        losses[dtype] = []
        for step in range(30):
            x, y = (t.to(device) for t in data.batch("train", 16, torch.Generator().manual_seed(step)))
            torch.manual_seed(step)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                m = model.learn(x, y, 1.0)
                traj = predict(model, x)
            assert all(torch.isfinite(t).all() for t in traj.ys + traj.energies), dtype
            assert traj.ys[-1].dtype == torch.float32  # the logits being descended stay fp32
            assert all(torch.isfinite(p.grad).all() for p in model.parameters()), dtype
            opt.step()
            opt.zero_grad()
            losses[dtype].append(m["loss"].item())
    fp32, bf16 = torch.tensor(losses[torch.float32]), torch.tensor(losses[torch.bfloat16])
    assert fp32[-1] < fp32[0] - 0.5 and bf16[-1] < bf16[0] - 0.5  # both learn
    # step by step the same numbers to bf16 precision; later the runs drift apart as any two runs do
    # (Adam amplifies tiny differences), so compare where training got to
    torch.testing.assert_close(bf16[:5], fp32[:5], rtol=0.01, atol=0)
    assert abs(bf16[-10:].mean() - fp32[-10:].mean()) < 0.05 * fp32[-10:].mean(), (fp32, bf16)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_uses_fused_adamw_with_the_step_size_group(tmp_path, monkeypatch):
    built = []
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: built.append(k) or adamw(*a, **k))
    tok, data = words_data()
    model = ebt.build_model(config(vocab_size=tok.vocab_size, step_size=20.0), seed=0)
    ebt.train(model, data, train_config(tmp_path, device="cuda", max_steps=4), Silent())
    assert built[0]["fused"] is True
    assert model.step_size().item() != 20.0 and all(torch.isfinite(p).all() for p in model.parameters())
    assert rundir.load_checkpoint(tmp_path / "out" / "ckpt.pt")["step"] == 4


# -----------------------------------------------------------------------------
# Generation, self-verification, and the plots of thinking

@pytest.mark.parametrize("device", ["cpu", *CUDA])
@pytest.mark.parametrize("kind", ["ebt", "transformer"])
def test_cached_generation_matches_full_recompute(kind, device):
    """Same seed, same tokens, and the same logits at every position, also after the window has crossed
    block_size (16) and the cache was re-filled twice."""
    model = tiny(model=kind).to(device).eval()
    prompt = torch.randint(13, (2, 5), generator=torch.Generator().manual_seed(1)).to(device)
    thinking = {"candidates": 2, "steps": 3} if kind == "ebt" else {}

    def run(use_cache):
        torch.manual_seed(3)  # the Langevin noise of the candidates
        return ebt.generate(model, prompt, 22, generator=torch.Generator().manual_seed(2), use_cache=use_cache,
                            **thinking)
    cached, full = run(True), run(False)
    assert cached.idx.shape == (2, 27)  # windows re-filled at lengths 17 and 25
    assert torch.equal(cached.idx, full.idx)
    torch.testing.assert_close(cached.logits, full.logits, rtol=0, atol=1e-9)
    if kind == "ebt":
        torch.testing.assert_close(cached.energy, full.energy, rtol=0, atol=1e-9)


def test_transformer_generation_logits_are_the_last_position_of_a_full_pass():
    model = tiny(model="transformer").eval()
    prompt = torch.randint(13, (1, 4), generator=torch.Generator().manual_seed(1))
    out = ebt.generate(model, prompt, 10, temperature=0)
    for t in range(10):
        torch.testing.assert_close(out.logits[:, t], model.logits(out.idx[:, :4 + t])[0][:, -1], rtol=0, atol=1e-9)
    with pytest.raises(ebt.UsageError, match="needs an EBT"):
        ebt.generate(model, prompt, 1, candidates=2)


GENERATE_MISUSES = [  # (case, the argument named, generate()'s keywords over a good call)
    ("float ids", "idx", {"idx": torch.zeros(1, 3)}), ("1-D ids", "idx", {"idx": torch.zeros(3, dtype=torch.long)}),
    ("empty prompt", "idx", {"idx": torch.zeros(1, 0, dtype=torch.long)}),
    ("an id past the vocabulary", "idx", {"idx": torch.tensor([[0, 13]])}),
    ("a negative id", "idx", {"idx": torch.tensor([[-1, 0]])}), ("ids in a list", "idx", {"idx": [[0, 1]]}),
    ("negative count", "num_tokens", {"num_tokens": -1}), ("NaN temperature", "temperature", {"temperature": math.nan}),
    ("negative temperature", "temperature", {"temperature": -0.5}), ("zero top_k", "top_k", {"top_k": 0}),
    ("no candidates", "candidates", {"candidates": 0}), ("negative steps", "steps", {"steps": -2}),
    ("zero steps", "steps", {"steps": 0}), ("fractional steps", "steps", {"steps": 2.5}),
    ("negative tolerance", "tolerance", {"tolerance": -1e-3}), ("zero step size", "step_size", {"step_size": 0.0}),
    ("NaN noise", "langevin_std", {"langevin_std": math.nan}), ("a flag as steps", "steps", {"steps": True}),
]


@pytest.mark.parametrize("case, name, call", GENERATE_MISUSES, ids=[c for c, _, _ in GENERATE_MISUSES])
def test_generate_names_an_impossible_argument_in_a_value_error(case, name, call):
    model = tiny().eval()
    with pytest.raises(ValueError, match=rf"^generate\.{name}="):
        ebt.generate(model, **{"idx": torch.zeros(1, 3, dtype=torch.long), "num_tokens": 2, **call})
    assert len(ebt.generate(model, torch.tensor([[0, 12]], dtype=torch.int), 2, steps=1).idx[0]) == 4  # the limits pass


@pytest.mark.parametrize("kind", ["ebt", "transformer"])
def test_ids_without_a_token_are_never_thought_of_nor_sampled(kind):
    """A padded vocabulary (rundir.load_text_model sets model.padded): thinking's candidates put no probability on
    its ids, and generate never samples one, even where the model favours them."""
    model = tiny(model=kind, vocab_size=20).eval()
    model.padded = torch.arange(20) >= 13
    if kind == "transformer":
        with torch.no_grad():
            model.lm_head.weight[13:] = model.lm_head.weight[13:] * 100
    else:
        probs = model.normalize(torch.randn(3, 2, 20))
        assert probs.sum(-1).allclose(torch.ones(3, 2)) and (probs[..., 13:] == 0).all()
    thinking = {"candidates": 3, "steps": 2} if kind == "ebt" else {}
    out = ebt.generate(model, torch.zeros(2, 1, dtype=torch.long), 40, temperature=3.0,
                       generator=torch.Generator().manual_seed(0), **thinking)
    assert out.idx.max() < 13


def test_self_verification_keeps_the_lowest_final_energy():
    model = tiny(step_size=0.5).eval()
    prompt = torch.randint(13, (3, 4), generator=torch.Generator().manual_seed(1))
    out = ebt.generate(model, prompt, 6, generator=torch.Generator().manual_seed(2), candidates=5, steps=3)
    assert out.candidate_energy.shape == (3, 6, 5)
    spread = out.candidate_energy.max(-1).values - out.candidate_energy.min(-1).values
    assert (spread > 1e-6).all()  # the candidates really differ, so the choice matters
    for t in range(6):  # the kept logits, scored again from scratch, are the lowest of all candidates
        energy = model.energy(out.logits[:, t:t + 1].softmax(-1), model.context(out.idx[:, :4 + t]), 1)[:, 0]
        torch.testing.assert_close(energy, out.energy[:, t], rtol=0, atol=1e-9)
        assert (energy[:, None] <= out.candidate_energy[:, t] + 1e-12).all()


def test_self_verification_never_keeps_a_nan_candidate():
    x = torch.arange(3.0).reshape(1, 3, 1, 1)  # (B=1, N=3, P=1, 1)
    assert ebt.keep_lowest(x, torch.tensor([[[float("nan")], [2.0], [1.0]]])).item() == 2.0
    assert ebt.keep_lowest(x, torch.tensor([[[float("nan")], [0.5], [1.0]]])).item() == 1.0


def test_sampling_follows_the_distribution_top_k_and_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    share = lambda **kw: torch.bincount(ebt.sample_next(logits, generator=g, **kw)[:, 0], minlength=4).float() / 20000
    torch.testing.assert_close(share(), logits[0].softmax(-1), atol=0.015, rtol=0)
    torch.testing.assert_close(share(temperature=0.5), (logits[0] / 0.5).softmax(-1), atol=0.015, rtol=0)
    torch.testing.assert_close(share(top_k=2), torch.tensor([0.0, 1 / (1 + math.e), math.e / (1 + math.e), 0.0]),
                               atol=0.015, rtol=0)
    assert (ebt.sample_next(logits[:3], temperature=0) == 2).all()


@pytest.mark.parametrize("plot, numbers_shape", [
    (plots.plot_energy_per_step, (10, 4)),
    (plots.plot_energy_landscape, (9, 9)), (plots.plot_distribution_sharpening, (4, 17))])
def test_plot_functions_return_a_figure_and_write_a_png(plot, numbers_shape, tmp_path):
    tokenizer = CharTokenizer(sorted(set(synthetic_text())))
    model = tiny(vocab_size=tokenizer.vocab_size).eval()
    fig, numbers = plot(model, tokenizer, "the cat sat", steps=3, **({"grid": 9} if "landscape" in plot.__name__ else {}))
    assert fig.axes[0].get_title() and fig.axes[-2].get_xlabel()
    # plot and colour bar; sharpening: the entropy above
    assert len(fig.axes) == (3 if plot is plots.plot_distribution_sharpening else 2)
    assert tuple(numbers.shape) == numbers_shape and torch.isfinite(numbers).all()
    fig.savefig(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "plot.png").stat().st_size > 1000
    assert fig._repr_png_()[:4] == b"\x89PNG"  # Jupyter shows it by itself, with no %matplotlib inline


def test_plots_default_to_thinking_longer_than_trained_with_integer_ticks():
    tokenizer = CharTokenizer(sorted(set(synthetic_text())))
    model = tiny(vocab_size=tokenizer.vocab_size).eval()
    fig, energies = plots.plot_energy_per_step(model, tokenizer, "the cat sat")
    assert energies.shape[1] == ebt.THINK_LONGER * model.trained_steps() + 1
    ticks = [t for t in fig.axes[0].get_xticks() if 0 <= t <= energies.shape[1] - 1]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert "landscape" in fig.axes[0].get_xlabel()


def test_the_landscape_names_its_prediction_and_landscape_and_numbers_its_steps():
    tokenizer = CharTokenizer(sorted(set(synthetic_text())))
    model = tiny(vocab_size=tokenizer.vocab_size).eval()
    fig, _ = plots.plot_energy_landscape(model, tokenizer, "the cat sat", steps=3, grid=5)
    ax = fig.axes[0]
    assert ax.get_title() == "predicting 't' after 'the cat sa' (token 10 of 10)\non the landscape of step 2 (which steps 2 to 3 share)"
    assert "descent: start, then 3 steps" in ax.get_legend_handles_labels()[1]


def collect_figures(monkeypatch):
    """Every Figure plots.py makes from now on, in order."""
    figures, make = [], plots.figure
    monkeypatch.setattr(plots, "figure", lambda **kw: figures.append(make(**kw)) or figures[-1])
    return figures


def test_every_figure_sample_writes_names_its_checkpoint_and_step(checkpoints, tmp_path, monkeypatch, capsys):
    figures = collect_figures(monkeypatch)
    sample.main(["--ckpt", str(checkpoints["ebt"]), "--num_tokens", "3", "--device", "cpu", "--plots", str(tmp_path)])
    step = torch.load(checkpoints["ebt"], weights_only=True)["step"]
    assert len(figures) == 4 and {f._supxlabel.get_text() for f in figures} == {f"{checkpoints['ebt']}, step {step}"}


def test_plot_generation_takes_what_generate_returns():
    model = tiny(landscapes=1, step_size=0.5).eval()
    out = ebt.generate(model, torch.zeros(1, 2, dtype=torch.long), 5, steps=10, tolerance=1e-4)
    fig, energies = plots.plot_generation(model, out)
    assert energies.shape == (5, int(out.steps_used.max()) + 1)
    for row, used in zip(energies, out.steps_used[0]):  # a token that stopped early ends early
        assert torch.isfinite(row[:used + 1]).all() and torch.isnan(row[used + 1:]).all()
    assert fig._repr_png_()[:4] == b"\x89PNG"
    with pytest.raises(ebt.UsageError, match="needs an EBT"):
        plots.plot_generation(tiny(model="transformer"), out)


@pytest.mark.slow
def test_the_notebook_runs_from_a_fresh_clone_after_the_readmes_quick_run(tmp_path, monkeypatch):
    """notebooks/thinking.ipynb, read with the standard library, its code cells executed in order the way
    Jupyter would (from notebooks/), in a copy of the repository holding no run, no environment variable
    set: after the quick text run (here tiny), its sums and image sections train what they need (here tiny)."""
    clone = tmp_path / "clone"
    shutil.copytree(HERE, clone, ignore=shutil.ignore_patterns(".git", "out*", "cache", "addition", "plots", "*.pt",
                                                               "__pycache__", ".pytest_cache"))
    train_text.main([*TINY, "--out_dir", str(clone / "out-text-quick")], log=quiet)
    real = train_image.main
    monkeypatch.setattr(train_image, "main", lambda argv: real([*argv, *TINY_IMAGE]))  # the notebook's flags, tiny
    real_text = train_text.main
    monkeypatch.setattr(train_text, "main", lambda argv: real_text([*argv, *TINY], log=quiet))  # the sums EBT, tiny
    monkeypatch.setattr(sys, "path", list(sys.path))  # the notebook adds the repository to it
    monkeypatch.chdir(clone / "notebooks")
    notebook = json.loads((clone / "notebooks" / "thinking.ipynb").read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert not any("environ" in "".join(c["source"]) for c in cells)
    scope, shown = {}, []
    for cell in cells:
        source = "".join(cell["source"])
        last = source.rstrip().splitlines()[-1]
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(source, "notebook", "exec"), scope)
        if not last.startswith((" ", "print(")) and "=" not in last:  # a cell's last expression is what it shows
            shown.append(eval(last, scope))
    assert len(shown) == 8 and all(fig._repr_png_()[:4] == b"\x89PNG" for fig in shown)
    labels = [fig._supxlabel.get_text() for fig in shown]  # each names the checkpoint and step it shows
    step = torch.load(clone / "out-text-quick" / "best.pt", weights_only=True)["step"]
    sums_step = torch.load(clone / "notebooks" / "out-sums-notebook" / "best.pt", weights_only=True)["step"]
    assert labels == ([f"../out-text-quick/best.pt, step {step}"] * 5 + [f"out-sums-notebook/best.pt, step {sums_step}"]
                      + ["out-image-notebook/ckpt.pt, step 4"] * 2)
    assert all(any(o.get("output_type") in ("display_data", "execute_result") or o.get("name") == "stdout"
                   for o in c["outputs"]) for c in cells), "the shipped notebook is executed"


def test_thinking_curves_are_the_perplexity_of_each_step_count_on_the_seeded_windows(tmp_path):
    """What every Results table reads: exp(CE) of the logits after k steps, on windows and starts drawn from
    the seed's generator (windows first, then the starts), the same on every call; N = 1 candidate is
    thinking as trained; the table and the plot show them."""
    tokenizer = CharTokenizer(sorted(set(synthetic_text())))
    ids = torch.tensor(tokenizer.encode(synthetic_text(300)))
    model = tiny(vocab_size=tokenizer.vocab_size, step_size=0.5).eval()
    curves = measure.thinking_curves(model, ids, steps=(1, 3), candidates=(1, 4), windows=3, seed=4)
    assert curves == measure.thinking_curves(model, ids, steps=(1, 3), candidates=(1, 4), windows=3, seed=4)
    trained = measure.thinking_curves(model, ids, steps=(model.trained_steps(),), candidates=(1,), windows=3, seed=4)
    assert curves["candidates"][1] == trained["steps"][model.trained_steps()]  # one candidate: as trained, no noise
    g = torch.Generator().manual_seed(4)
    x, y = random_windows(ids, model.config.block_size, 3, g)
    y0 = model.initial_logits(*x.shape, "cpu", g)
    for k in (1, 3):
        logits = predict(model, x, steps=k, y0=y0).ys[k]
        assert curves["steps"][k] == pytest.approx(math.exp(ebt.cross_entropy(logits, y)), rel=1e-6)
    assert curves["steps"][1] != pytest.approx(curves["steps"][3], rel=1e-3)  # the steps change the answer
    results = {"ebt": curves, "other": {kind: {k: 2 * v for k, v in curves[kind].items()} for kind in ("steps", "candidates")}}
    table = measure.thinking_table(results, trained_steps=3)
    assert "3 steps (trained)" in table and "candidates at 3 steps" in table and f"{2 * curves['steps'][3]:.3f}" in table
    fig = plots.plot_thinking_curves(results, trained_steps=3)
    assert [ax.get_ylabel() for ax in fig.axes[::2]] == ["perplexity, ebt", "perplexity, other"]
    assert len(fig.axes[0].get_lines()) == 2  # its curve and the trained steps
    fig.canvas.draw()  # each source on its own scale: one shared axis flattens both
    assert fig.axes[0].get_ylim()[1] < fig.axes[2].get_ylim()[0]



def average_ranks(values):
    """Ranks 0..n-1 of a list, equal values sharing their mean rank: the textbook rule, by sorting."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks, i = [0.0] * len(values), 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def test_spearman_ranks_with_ties_shared():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (2, 7, 3), generator=g).float()  # few values: many ties
    y = torch.randn(2, 7, 3, generator=g)
    r = measure.spearman(x, y)
    for b in range(2):
        for p in range(3):
            rx, ry = (average_ranks(t[b, :, p].tolist()) for t in (x, y))
            want = np.corrcoef(rx, ry)[0, 1] if len(set(rx)) > 1 else 0.0
            assert r[b, p].item() == pytest.approx(want, abs=1e-12)
    assert (measure.spearman(y, y) == 1).all() and (measure.spearman(-y, y) == -1).all()
    assert (measure.spearman(torch.zeros_like(y), y) == 0).all()  # an energy that ranks nothing


def test_verifier_diagnostics_on_energies_whose_answer_is_known():
    """An energy equal to the cross-entropy ranks perfectly and picks what the oracle picks; its negation
    picks the worst; a constant energy is a random pick; a step that changes nothing changes no argmax."""
    g = torch.Generator().manual_seed(1)
    W, N, S, V = 2, 5, 6, 7
    logits = torch.randn(W, N, S, V, generator=g)
    targets = torch.randint(0, V, (W, S), generator=g)
    ce = -logits.log_softmax(-1).gather(-1, targets[:, None, :, None].expand(W, N, S, 1))[..., 0]  # (W, N, S)
    one = [torch.randn(W, S, V, generator=g)]
    one += [one[0], one[0].flip(-1)]  # step 1 changes nothing, step 2 reverses every distribution
    check = lambda energy: measure.verifier(one, logits, energy, targets, (1, 2, N), examples=3)
    perfect, worst, constant = check(ce), check(-ce), check(torch.full_like(ce, 0.5))
    assert perfect["correlation"] == pytest.approx(1) and worst["correlation"] == pytest.approx(-1)
    assert constant["correlation"] == 0
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    assert check(entropy)["entropy correlation"] == pytest.approx(1) and perfect["entropy correlation"] < 0.99
    for n in (1, 2, N):
        best = perfect["best of"]
        assert best["energy"][n] == pytest.approx(ce[:, :n].min(1).values.mean().item(), rel=1e-6) == best["oracle"][n]
        assert worst["best of"]["energy"][n] == pytest.approx(ce[:, :n].max(1).values.mean().item(), rel=1e-6)
        assert constant["best of"]["energy"][n] == pytest.approx(ce[:, :n].mean().item(), rel=1e-6)
        assert constant["best of"]["random"][n] == pytest.approx(constant["best of"]["energy"][n], rel=1e-12)
    assert perfect["argmax changed"][1] == 0 and perfect["CE change"][1] == 0
    flipped = (one[0].argmax(-1) != one[0].flip(-1).argmax(-1)).double().mean().item()
    assert perfect["argmax changed"][2] == flipped > 0.5
    by_hand = lambda y: torch.nn.functional.cross_entropy(y.reshape(-1, V), targets.reshape(-1)).item()
    assert perfect["CE change"][2] == pytest.approx(by_hand(one[2]) - by_hand(one[0]), rel=1e-6)
    assert len(perfect["examples"]["energy"]) == 3 and len(perfect["examples"]["CE"][0]) == N


def test_thinking_curves_verify_as_their_candidates_curve_does():
    """The verifier's pick by energy is the candidates curve (two computations: keep_lowest then one
    cross-entropy, and per-candidate cross-entropies then best_of); the table and plot show it."""
    tokenizer = CharTokenizer(sorted(set(synthetic_text())))
    ids = torch.tensor(tokenizer.encode(synthetic_text(300)))
    model = tiny(vocab_size=tokenizer.vocab_size, step_size=0.5).eval()
    curves = measure.thinking_curves(model, ids, steps=(1, 3), candidates=(1, 2, 4), windows=3, seed=4)
    v = curves["verifier"]
    for n in (2, 4):
        assert v["best of"]["energy"][n] == pytest.approx(math.log(curves["candidates"][n]), rel=1e-5)
        assert v["best of"]["oracle"][n] < v["best of"]["random"][n]
    assert set(v["argmax changed"]) == {1, 2, 3} and v["argmax changed"][1] > 0.5  # from random logits
    results = {"val": curves, "OOD": curves}
    assert "Spearman(final energy, CE)" in measure.verifier_table(results)
    fig = plots.plot_verifier(results)
    assert len(fig.axes) == 3 and fig.axes[-1].get_ylabel() == "perplexity change vs a random pick (%)"


def test_ood_text_is_filtered_to_the_vocabulary():
    tokenizer = CharTokenizer(sorted(set(synthetic_text())))
    from pydoc_data.topics import topics  # the default OOD text: Python's documentation
    text = "\n\n".join(topics[k] for k in sorted(topics))[:2000]
    _, ids, dropped = measure.validation_and_ood(tokenizer, types.SimpleNamespace(val=None), text)
    assert dropped > 0 and len(ids) + dropped == 2000  # encoded with no error: every remaining character is known


def test_progress_says_how_far_and_how_long_is_left_while_the_work_runs(capsys):
    progress = rundir.Progress("thinking", 4, after=0.1, every=10)
    progress.advance(1)
    assert capsys.readouterr().err == ""  # work that ends within seconds says nothing
    time.sleep(0.2)
    progress.advance(1)
    progress.advance(1)  # the next line waits `every` seconds
    assert re.fullmatch(r"\[thinking: 50% in 0m00s, about 0m00s left\]\n", capsys.readouterr().err)


@pytest.mark.parametrize("thinking", [dict(steps=3, candidates=2), dict(steps=4, tolerance=0.0)])
def test_thinking_progress_counts_every_energy_generation_scores(thinking):
    """sample.py's progress moves within one token's thinking (a hook on the energy head), and energies_scored
    says how many it will count: exactly, or at most when thinking adaptively stops early."""
    model = tiny().float().eval()
    expected = 5 * measure.energies_scored(1, thinking["steps"], thinking.get("candidates", 1), thinking.get("tolerance"))
    with measure.progress(model, "generating", expected) as progress:
        ebt.generate(model, torch.zeros(1, 2, dtype=torch.long), 5, generator=torch.Generator().manual_seed(0), **thinking)
    assert progress.done == expected if "tolerance" not in thinking else 0 < progress.done <= expected


def test_sample_streams_its_text_as_it_generates(checkpoints):
    """The prompt and the first tokens are printed while the rest is still being thought about."""
    proc = subprocess.Popen([sys.executable, "sample.py", "--ckpt", str(checkpoints["ebt"]), "--prompt", "the cat",
                             "--num_tokens", "100000", "--steps", "50", "--device", "cpu"], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.read(len("the cat") + 2).startswith(b"the cat") and proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Runs of a tiny EBT and Transformer++ on the synthetic words and of an image EBT, one step each; a
    corrupt checkpoint; a file where a directory should be."""
    tmp = tmp_path_factory.mktemp("checkpoints")
    paths = {"words": tmp / "words.txt"}
    paths["words"].write_text(synthetic_text())
    for kind in ("ebt", "transformer"):
        train_text.main([*TINY, "--model", kind, "--max_steps", "1", "--data", str(paths["words"]), "--out_dir",
                         str(tmp / kind)], log=quiet)
        paths[kind] = tmp / kind / "ckpt.pt"
    train_image.main(["--out_dir", str(tmp / "image"), *TINY_IMAGE, "--max_steps", "1", "--eval_interval", "1",
                      "--report_steps", "1", "--passes", "1"])  # later flags win
    paths["image"] = tmp / "image" / "ckpt.pt"
    ckpt = torch.load(paths["ebt"], weights_only=True)
    for name, content in (("nan", {**ckpt, "model": {k: v * float("nan") for k, v in ckpt["model"].items()}}),
                          ("nostep", {k: v for k, v in ckpt.items() if k != "step"}),
                          ("fracstep", {**ckpt, "step": 1.5}), ("negstep", {**ckpt, "step": -3}),
                          ("strlayers", {**ckpt, "model_config": {**ckpt["model_config"], "n_layer": "1"}}),
                          ("widetok", {**ckpt, "tokenizer": {"kind": "char", "chars": "".join(map(chr, range(40, 140)))}}),
                          ("badtok", {**ckpt, "tokenizer": {"kind": "sentencepiece"}})):
        paths[name] = tmp / name / "ckpt.pt"
        paths[name].parent.mkdir()
        torch.save(content, paths[name])
    paths["corrupt"] = tmp / "corrupt" / "ckpt.pt"
    paths["corrupt"].parent.mkdir()
    paths["corrupt"].write_bytes(b"not a checkpoint at all")
    paths["file"] = tmp / "a_file"
    paths["file"].write_text("x")
    return paths


def test_sample_eval_reads_the_text_the_checkpoint_was_trained_on(tmp_path, text_file, capsys):
    tok = CharTokenizer(sorted(set(text_file.read_text())))
    cfg = config(vocab_size=tok.vocab_size)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": ebt.build_model(cfg).state_dict(), "model_config": dataclasses.asdict(cfg), "tokenizer": tok.state(),
                "data": {"path": str(text_file), "sha256": hashlib.sha256(text_file.read_bytes()).hexdigest()}}, ckpt)
    sample.main(["--ckpt", str(ckpt), "--eval", "--windows", "2", "--device", "cpu", "--ood", str(text_file)])
    out = capsys.readouterr().out
    assert out.startswith("OOD text words.txt: ") and "perplexity" in out
    with pytest.raises(ebt.UsageError, match="not the corpus"):  # a checkpoint from before prepared corpora: checksum
        sample.main(["--ckpt", str(ckpt), "--eval", "--data", str(HERE / "README.md"), "--device", "cpu"])


def test_sample_generates_and_saves_plots(checkpoints, tmp_path):
    r = run_script("sample.py", "--ckpt", str(checkpoints["ebt"]), "--prompt", "the cat", "--num_tokens", "12",
                   "--steps", "3", "--candidates", "2", "--tolerance", "1e-4", "--top_k", "5", "--device", "cpu",
                   "--plots", str(tmp_path / "plots"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the cat") and len(r.stdout.rstrip("\n")) >= len("the cat") + 12
    assert "steps used" in r.stderr
    for name in ("energy_per_step", "energy_landscape", "distribution_sharpening", "generation"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000


# -----------------------------------------------------------------------------
# torch.compile: the compiled model against eager

@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", *CUDA])
def test_compiled_generation_and_evaluation_match_eager(device):
    """--compile compiles each generated token whole (context, thinking by a torch.func gradient, choice of
    candidate) and evaluation's thinking: same tokens, logits and energies as eager, also once the window
    restarted. The preallocated KV cache keeps a token's shapes fixed: one graph serves every position."""
    from torch._dynamo.utils import counters
    model = tiny(step_size=0.1).to(device).eval()
    fast_model = compiled.compile_model(copy.deepcopy(model))
    graphs = [counters["stats"]["unique_graphs"]]
    prompt = torch.randint(13, (1, 3), generator=torch.Generator().manual_seed(1)).to(device)
    eager = ebt.generate(model, prompt, 15, generator=torch.Generator().manual_seed(0))
    fast = ebt.generate(fast_model, prompt, 15, generator=torch.Generator().manual_seed(0),
                        on_token=lambda idx: graphs.append(counters["stats"]["unique_graphs"]))
    assert torch.equal(fast.idx, eager.idx)
    torch.testing.assert_close(fast.logits, eager.logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(fast.energy, eager.energy, rtol=0, atol=1e-10)
    assert graphs[2] > graphs[0]  # compiled, not run eagerly behind our back
    assert graphs[2] == graphs[13], graphs  # tokens 3 to 13, positions 5 to 15: no graph more
    ebt.generate(fast_model, prompt.flip(1), 15, generator=torch.Generator().manual_seed(1))
    assert counters["stats"]["unique_graphs"] == graphs[-1]  # nor for another prompt and a new cache
    idx = torch.randint(13, (3, 16), generator=torch.Generator().manual_seed(0)).to(device)
    losses = []
    for m in (model, fast_model):
        torch.manual_seed(5)
        losses.append(m(idx, idx, steps=3)[1]["loss_per_step"])
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", *CUDA])
@pytest.mark.parametrize("recipe", ["s1", "s2"])
def test_the_compiled_training_step_gives_the_eager_gradients(recipe, device):
    """--compile makes learn() one graph: torch.func.grad of the loss through the same think(), every gradient
    of the energy by torch.func. Float64, and the compiler draws the random numbers eager draws (Langevin
    noise, per-token step sizes; fallback_random), so the parameter gradients agree to rounding (1e-10)."""
    import torch._inductor.config
    with torch._inductor.config.patch(fallback_random=True):  # torch's own patch: monkeypatch's undo deletes it
        compiled_step_matches_eager(recipe, device)


def compiled_step_matches_eager(recipe, device):
    kw = dict(step_size=0.5, langevin_std=0.3, random_step_size=2.0) if recipe == "s1" else S2
    model = tiny(weights=0.3, n_layer=1, **kw).to(device).train()
    fast_model = compiled.compile_model(copy.deepcopy(model))
    g = torch.Generator().manual_seed(6)
    for _ in range(2):  # S2: the second batch also replays the first's sequences
        batch = tuple(torch.randint(13, (3, 16), generator=g).to(device) for _ in range(2))
        grads = []
        for m in (model, fast_model):
            m.zero_grad(set_to_none=True)
            torch.manual_seed(4)
            metrics = m.learn(*batch, 0.5, steps=2, generator=torch.Generator().manual_seed(1))
            grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and len(grads[0]) >= len(list(model.parameters())) - 1
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-10, atol=1e-12, msg=n)
        assert "final" not in metrics and math.isfinite(metrics["loss"])
    if recipe == "s2":
        assert torch.equal(fast_model.replay.kept["idx"], model.replay.kept["idx"])
        torch.testing.assert_close(fast_model.replay.kept["logits"], model.replay.kept["logits"], rtol=1e-10, atol=1e-12)


# -----------------------------------------------------------------------------
# Flags and configuration layering

@pytest.mark.parametrize("kw, field", [
    (dict(n_embd=30, n_head=4), "n_embd"), (dict(think_steps=0), "think_steps"), (dict(step_size=0.0), "step_size"),
    (dict(step_size=-1.0), "step_size"), (dict(model="rnn"), "model"), (dict(random_step_size=0.5), "random_step_size"),
    (dict(init_std=-1.0), "init_std"), (dict(langevin_std=float("nan")), "langevin_std"), (dict(landscapes=3), "landscapes"),
    (dict(think_steps=100000), "think_steps"), (dict(n_layer=2.5), "n_layer"), (dict(n_head="2"), "n_head"),
    (dict(detach=1), "detach"), (dict(n_layer=True), "n_layer"), (dict(init_std=1e9), "init_std"),
    (dict(langevin_std=1e30), "langevin_std")])
def test_config_rejects_impossible_values(kw, field):
    with pytest.raises(checks.ConfigError, match=f"ModelConfig.{field}=") as e:
        config(**kw)
    assert e.value.name == field and isinstance(e.value, ValueError)
    for kw, field in ((dict(max_steps=10**12), "max_steps"), (dict(lr=1), None), (dict(seed=1.0), "seed")):
        if field is None:
            ebt.TrainConfig(**kw)  # a float field takes an int
        else:
            with pytest.raises(checks.ConfigError, match=f"TrainConfig.{field}="):
                ebt.TrainConfig(**kw)
    with pytest.raises(ebt.UsageError, match="does not fit its own config"):
        rundir.load_model({"model_config": {**vars(config()), "no_such_option": 1}, "model": {}})


def test_flags_are_the_config_fields_with_their_help():
    """A driver's flag for a config field carries the field's help and type; a flag not given is None, so a
    resumed run knows what was given."""
    code, help_text, _ = run_cli(train_text.main, "--help")
    help_text = " ".join(help_text.split())
    exposed = [f for f in dataclasses.fields(ebt.ModelConfig) if f.name in train_text.MODEL_FLAGS + cli.THINKING_FLAGS]
    assert code == 0 and len(exposed) == len(train_text.MODEL_FLAGS) + len(cli.THINKING_FLAGS)
    for f in exposed:
        assert f"--{f.name}" in help_text and " ".join(f.metadata["help"].split()) in help_text, f.name
    args = train_text.parse_args(["--no-truncate", "--think_steps", "3"])
    assert args.truncate is False and args.think_steps == 3 and args.langevin_std is None


def trained_config(argv, monkeypatch):
    """What train_text.py would train with these flags: (model config, train config)."""
    built = []
    monkeypatch.setattr(ebt, "train", lambda model, data, tc, run=None: built.append((model, tc)))
    train_text.main(argv, log=quiet)
    return built[0]


def test_the_preset_follows_the_device_and_is_named_first(tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(ebt, "train", lambda model, data, tc, run=None: logged.append(tc))
    train_text.main(["--out_dir", str(tmp_path / "a"), "--device", "cpu"], log=logged.append)
    assert logged[0].startswith("preset cpu") and logged[-1].batch_size == train_text.PRESETS["cpu"]["batch_size"]
    logged.clear()
    train_text.main(["--preset", "gpu", "--batch_size", "2", "--out_dir", str(tmp_path / "b"), "--device", "cpu"],
                    log=logged.append)  # a batch this machine fits, whatever else it runs
    assert logged[0] == "preset gpu" and logged[1].startswith("warning:")


def test_the_quick_preset_is_small_and_trains_beside_the_real_run():
    assert {k: train_text.PRESETS["quick"][k] for k in ("n_layer", "n_embd", "max_steps")} == dict(
        n_layer=2, n_embd=64, max_steps=500)  # what the README's first command says it trains
    out_dir = lambda *argv: train_text.parse_args(list(argv)).out_dir
    assert (out_dir(), out_dir("--preset", "quick"), out_dir("--preset", "quick", "--model", "transformer")) == (
        "out-text", "out-text-quick", "out-text-transformer-quick")


def test_the_baseline_trains_beside_the_ebt_by_default():
    """python train_text.py, then python train_text.py --model transformer (README): two directories."""
    assert train_text.parse_args([]).out_dir != train_text.parse_args(["--model", "transformer"]).out_dir


def test_default_s1_step_size_is_a_quarter_of_the_square_root_of_the_vocabulary(tmp_path, monkeypatch):
    model, _ = trained_config(["--device", "cpu", "--out_dir", str(tmp_path / "a")], monkeypatch)  # 65 characters
    assert model.config.vocab_size == 65 and model.step_size().item() == 2.0 and model.config.step_size_lr_mult == 6.0
    model, _ = trained_config(["--device", "cpu", "--vocab_size", "50257", "--n_layer", "1", "--out_dir",
                               str(tmp_path / "b")], monkeypatch)
    assert model.step_size().item() == 56.0  # README "Choosing alpha"


@pytest.mark.parametrize("recipe", ["s1", "s2"])
def test_recipes_do_what_the_papers_job_scripts_do(recipe, tmp_path, monkeypatch):
    """ebt_s1.sh and ebt_s2.sh, observed on the model train_text.py builds for each recipe."""
    model, tc = trained_config(["--recipe", recipe, "--device", "cpu", "--out_dir", str(tmp_path)], monkeypatch)
    idx = torch.randint(65, (4, 16), generator=torch.Generator().manual_seed(0))
    metrics = model.learn(idx, idx, 1.0)
    alpha_groups = [g for g in ebt.param_groups(model, tc.weight_decay) if g["lr_mult"] != 1.0]
    draws = {model.draw_steps(random.Random(i)) for i in range(50)}
    losses = []
    for seed in (0, 1, 1):  # training: noisy (S2) or not (S1)
        torch.manual_seed(seed)
        losses.append(model(idx, idx, steps=2, generator=torch.Generator().manual_seed(0))[0].item())
    assert model.initial_logits(64, 64, "cpu").std().item() == pytest.approx(1.0, rel=0.05)  # N(0, 1) starts
    if recipe == "s1":
        assert draws == {2} and model.trained_steps() == 2 and len(model.step_emb.weight) == 2  # a landscape per step
        assert model.raw_step_size.requires_grad and alpha_groups[0]["weight_decay"] == 0
        assert alpha_groups[0]["lr_mult"] == 3 * model.step_size().item()  # the paper's 1500 at alpha 500
        assert metrics["loss"] == pytest.approx((metrics["loss_first"] + metrics["loss_last"]) / 2)  # mean over steps
        assert model.replay is None and losses[0] == losses[1]
    else:
        assert draws == {2, 3} and model.trained_steps() == 3 and len(model.step_emb.weight) == 1  # one landscape
        assert not model.raw_step_size.requires_grad and not alpha_groups and model.step_size().item() == 5.0
        assert metrics["loss"] == metrics["loss_last"]  # the last step's loss only
        assert model.replay.size == 192 and len(model.replay.kept["idx"]) == 4
        assert losses[0] != losses[1] == losses[2]  # Langevin noise and per-token alpha, from the seed


def test_legal_values_that_are_almost_surely_mistakes_get_one_warning_line(tmp_path, monkeypatch, text_file):
    monkeypatch.setattr(ebt, "train", lambda model, data, tc, run=None: None)
    (tmp_path / "one.txt").write_text("a" * 5000)
    for argv, warning in ((["--warmup_steps", "5000", "--max_steps", "10"], "never reaches --lr"),
                          (["--replay_batch", "0.25"], "--replay_batch does nothing"),
                          (["--recipe", "s2", "--step_size_lr_mult", "10"], "--step_size_lr_mult does nothing"),
                          (["--vocab_size", "100"], "never occur in the data"),
                          (["--data", str(tmp_path / "one.txt")], "one distinct token")):
        said = []
        train_text.main(["--device", "cpu", "--data", str(text_file), "--out_dir", str(tmp_path / str(len(argv))),
                         *argv], log=said.append)
        assert sum(line.startswith("warning:") and warning in line for line in said) == 1, said
        assert not [line for line in said if line.startswith("warning:") and warning not in line], said


# -----------------------------------------------------------------------------
# Resume, checkpoints and the run's log

def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    tok, data = words_data()
    model = ebt.build_model(config(vocab_size=tok.vocab_size))
    ebt.train(model, data, train_config(tmp_path, max_steps=3), rundir.Run(tmp_path / "out", {"tokenizer": tok.state()}, say=quiet))
    ckpt = rundir.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["step"] == 3 and ckpt["tokenizer"] == tok.state()
    loaded = rundir.load_model(ckpt)
    x, _ = data.batch("val", 4, generator=torch.Generator().manual_seed(0))
    outputs = []
    for m in (model.eval(), loaded):
        torch.manual_seed(7)
        traj = predict(m, x, steps=3)
        outputs.append((torch.stack(traj.ys[1:]), torch.stack(traj.energies)))
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
    assert [r["step"] for r in rundir.read_records(tmp_path / "out" / "metrics.jsonl")] == [1, 2, 3, 3]
    assert (tmp_path / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_best_pt_holds_the_model_at_its_lowest_validation_loss_and_sample_reads_it(tmp_path, text_file):
    out = tmp_path / "o"
    assert run_cli(train_text.main, *TINY, "--max_steps", "12", "--eval_interval", "2", "--lr", "0.05",
                   "--data", str(text_file), "--out_dir", str(out))[0] == 0
    evals = [r for r in rundir.read_records(out / "metrics.jsonl") if r["kind"] == "eval"]
    lowest = min(evals, key=lambda r: r["loss"])
    best, last = rundir.load_checkpoint(out / "best.pt"), rundir.load_checkpoint(out / "ckpt.pt")
    assert best["step"] == lowest["step"] and best["best_loss"] == last["best_loss"] == lowest["loss"]
    assert "optimizer" not in best and last["step"] == 12 != best["step"]  # this run's lowest is before its end
    code, _, err = run_cli(sample.main, "--out_dir", str(out), "--num_tokens", "3", "--device", "cpu")
    assert code == 0 and f"from {out / 'best.pt'}" in err, err


def test_logged_throughput_counts_the_steps_since_the_last_log_or_evaluation(tmp_path, monkeypatch):
    """A clock that moves one second per training batch: every logged tokens/s is then one step's
    tokens, also after an evaluation between logs and at a last step off the log grid."""
    tok, data = words_data()
    model, clock = ebt.build_model(config(model="transformer", vocab_size=tok.vocab_size)), [0.0]
    forward = model.forward

    def timed_forward(*a, **kw):
        clock[0] += model.training
        return forward(*a, **kw)
    monkeypatch.setattr(model, "forward", timed_forward)
    monkeypatch.setattr(ebt.time, "time", lambda: clock[0])  # the records' timestamps
    tc = train_config(tmp_path, max_steps=7, log_interval=2, eval_interval=3)
    ebt.train(model, data, tc, rundir.Run(tc.out_dir, say=quiet))
    logged = [(r["step"], r["tokens_per_s"]) for r in rundir.read_records(tmp_path / "out" / "metrics.jsonl")
              if r["kind"] == "train"]
    assert logged == [(s, float(tc.batch_size * data.tokens_per_sample)) for s in (1, 2, 4, 6, 7)]  # 1: no silence


def test_loss_plot_shows_the_trained_step_count_whatever_eval_thinks(tmp_path, monkeypatch):
    figures = []
    make = plots.figure
    monkeypatch.setattr(plots, "figure", lambda **kw: figures.append(make(**kw)) or figures[-1])
    for per_step, trained in (([3.0, 2.0, 1.5, 1.4], 2), ([3.0], 1), ([3.0, 2.0, 1.5], 3)):
        records = [{"kind": "eval", "step": s, "loss_per_step": per_step, "loss": per_step[trained - 1]}
                   for s in (10, 20)]
        plots.plot_metrics(records, tmp_path / "loss.png")
        labels = [line.get_label() for line in figures[-1].axes[0].get_lines()]
        assert len(labels) == len(set(labels)) and sum("as trained" in label for label in labels) == 1, labels
        assert f"val loss, {trained} thinking step{'s' if trained > 1 else ''} (as trained)" in labels
        assert figures[-1].axes[0].get_ylabel() == "loss (nats per token)"
    plots.plot_metrics([{"kind": "start", "step": 0, "model": "image_ebt"}, *records], tmp_path / "loss.png")
    assert "smooth L1 on pixels" in figures[-1].axes[0].get_ylabel()  # an image model's loss is no cross-entropy


def test_loss_plot_smooths_only_enough_points_and_is_not_written_before_the_first(tmp_path, monkeypatch):
    path, train = tmp_path / "loss.png", lambda n: [{"kind": "train", "step": s, "loss": 3.0 / s} for s in range(1, n + 1)]
    plots.plot_metrics([{"kind": "start", "step": 0}], path)
    assert not path.exists()  # a run stopped before its first log draws nothing, not an empty plot
    figures = collect_figures(monkeypatch)
    for n in (2, 10):
        plots.plot_metrics(train(n), path)
    few, many = ([line.get_label() for line in fig.axes[0].get_lines()] for fig in figures)
    assert few == ["train loss"] and "smoothed" in many[1]  # two points: raw, with no lagging smoothed line
    assert figures[0].axes[0].get_title() == f"training: {tmp_path.name}, up to step 2"


class InterruptAt:
    """Wraps TextData; raises KeyboardInterrupt (Ctrl-C) at the n-th training batch."""

    def __init__(self, data, n):
        self.data, self.n, self.tokens_per_sample = data, n, data.tokens_per_sample

    def batch(self, split, batch_size, generator):
        if split == "train":
            self.n -= 1
            if self.n < 0:
                raise KeyboardInterrupt
        return self.data.batch(split, batch_size, generator)


@pytest.mark.parametrize("recipe", ["s1", "s2"])
def test_interrupt_then_resume_continues_exactly(tmp_path, recipe):
    """S2 with its replay buffer, which the checkpoint carries."""
    thinking = dict(random_step_size=2.0, langevin_std=0.1) if recipe == "s1" else S2

    def run(tc, data, resume=False):
        torch.manual_seed(123)  # not tc.seed: resume must restore, not re-seed
        model = ebt.build_model(config(vocab_size=VOCAB, **thinking))
        return model, ebt.train(model, data, tc, rundir.Run(tc.out_dir, resume=resume, say=quiet))

    straight, _ = run(train_config(tmp_path / "a"), words_data()[1])
    tc = train_config(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):  # saved, then passed on: the driver exits 130
        run(tc, InterruptAt(words_data()[1], 4))  # Ctrl-C during step 5
    assert rundir.load_checkpoint(tmp_path / "b" / "out" / "ckpt.pt")["step"] == 4
    resumed, records = run(tc, words_data()[1], resume=True)
    assert [r["step"] for r in records if r["kind"] == "train"] == [5, 6]
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


class NaNAfter(torch.nn.Module):
    """A model whose loss (or, with gradient=True, only its gradient) turns NaN after n steps."""

    def __init__(self, model, n, gradient=False):
        super().__init__()
        self.model, self.n, self.config, self.gradient = model, n, model.config, gradient

    def forward(self, x, y):
        loss, m = self.model(x, y)
        self.n -= self.training
        if self.n >= 0 or not self.training:
            return loss, m
        if self.gradient:  # sqrt at 0: the loss stays, the gradient is 0 * inf
            return loss + (0 * next(self.model.parameters()).sum()).sqrt(), m
        return loss * float("nan"), m


@pytest.mark.parametrize("gradient", [False, True])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, gradient):
    _, data = words_data()
    # bad at the last of 6 steps: a NaN gradient no later loss would reveal
    model = NaNAfter(ebt.build_model(config(vocab_size=VOCAB, model="transformer")), 5, gradient)
    with pytest.raises(ebt.UsageError, match="NaN or infinite"):
        ebt.train(model, data, train_config(tmp_path, eval_interval=3), rundir.Run(tmp_path / "out", say=quiet))
    assert rundir.load_checkpoint(tmp_path / "out" / "ckpt.pt")["step"] == 3


def test_nan_before_the_first_evaluation_says_no_checkpoint_exists(tmp_path):
    _, data = words_data()
    model = NaNAfter(ebt.build_model(config(vocab_size=VOCAB, model="transformer")), 1)
    with pytest.raises(ebt.UsageError, match="no checkpoint was written yet"):
        ebt.train(model, data, train_config(tmp_path, eval_interval=100, max_steps=200), rundir.Run(tmp_path / "out", say=quiet))
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    rundir.write_atomically(path, lambda tmp: torch.save({"model": {}, "model_config": {}, "step": 1}, tmp))

    def crash(obj, f):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        rundir.write_atomically(path, lambda tmp: torch.save({"model": {}, "model_config": {}, "step": 2}, tmp))
    monkeypatch.undo()
    assert rundir.load_checkpoint(path)["step"] == 1


def test_resume_restores_the_runs_settings_and_refuses_a_conflict(tmp_path, text_file):
    out = str(tmp_path / "out")
    assert run_cli(train_text.main, *TINY, "--out_dir", out, "--data", str(text_file), "--lr", "0.004",
                   "--recipe", "s2")[0] == 0
    code, stdout, err = run_cli(train_text.main, "--resume", "--out_dir", out, "--max_steps", "6", "--device", "cpu")
    assert code == 0, err
    ckpt = rundir.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["step"] == 6 and ckpt["train_config"]["lr"] == 0.004 and ckpt["train_config"]["batch_size"] == 4
    assert ckpt["model_config"]["n_embd"] == 16 and ckpt["model_config"]["replay_size"] == 192
    assert "notice: --max_steps 6 overrides the checkpoint's 4" in stdout
    code, stdout, err = run_cli(train_text.main, "--resume", "--out_dir", out, "--device", "cpu")
    assert code == 0 and "nothing to train" in stdout and rundir.load_checkpoint(tmp_path / "out" / "ckpt.pt")["step"] == 6
    for conflict, message in ((["--n_embd", "32"], "--n_embd 32 conflicts"), (["--tokenizer", "gpt2"], "tokenizer"),
                              (["--data", str(HERE / "README.md")], "not the corpus"),
                              (["--recipe", "s1"], "--recipe s1 conflicts"), (["--preset", "gpu"], "--preset gpu")):
        code, _, err = run_cli(train_text.main, "--resume", "--out_dir", out, "--device", "cpu", *conflict)
        assert code == 2 and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 640 vs 548"),
                                   RuntimeError("basic_ios::clear: iostream error")])
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, error):
    saves, save = [], torch.save

    def full_after_one(obj, f):
        saves.append(f)
        if len(saves) > 1:  # the first checkpoint fits; then the disk is full, halfway through a write
            Path(f).write_bytes(b"half")
            raise error
        save(obj, f)
    monkeypatch.setattr(torch, "save", full_after_one)
    code, _, err = run_cli(train_text.main, *TINY, "--out_dir", str(tmp_path / "o"))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert ("No space left" if isinstance(error, OSError) else "disk full") in err and str(error) in err
    monkeypatch.undo()
    assert rundir.load_checkpoint(tmp_path / "o" / "ckpt.pt")["step"] == 2 and not list((tmp_path / "o").glob("*.tmp"))


def test_a_metrics_log_with_stray_lines_is_read_past_and_a_directory_is_named(tmp_path):
    out = tmp_path / "o"
    assert run_cli(train_text.main, *TINY, "--max_steps", "2", "--out_dir", str(out))[0] == 0
    with open(out / "metrics.jsonl", "ab") as f:  # a list, a record without a step, random bytes, a torn line,
        f.write(b'[1, 2]\n{"kind": "train"}\n\xff\xfe\x00garbage\n{"kind": "train", "st\n'
                b'{"kind": "train", "step": 1}\n{"kind": "eval", "step": 1, "loss": "low"}\n'  # records the plots
                b'{"kind": "eval", "step": 2, "loss": 1.0, "loss_per_step": [1, null]}\n'    # cannot read,
                b'{"kind": "train", "step": 1.5, "loss": 1.0}\n{"kind": "train", "step": -1, "loss": 1.0}\n')  # steps
    code, _, err = run_cli(train_text.main, "--resume", "--out_dir", str(out), "--max_steps", "3", "--device", "cpu")
    assert code == 0, err
    assert [r["step"] for r in rundir.read_records(out / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3]
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").mkdir()
    code, _, err = run_cli(train_text.main, "--resume", "--out_dir", str(out), "--max_steps", "4", "--device", "cpu")
    assert code == 2 and "is a directory" in err and err.count("\n") == 1, err


def test_a_checkpoint_is_never_of_weights_whose_validation_is_not_finite(tmp_path):
    code, _, err = run_cli(train_text.main, *TINY, "--lr", "1e30", "--eval_interval", "1", "--out_dir",
                           str(tmp_path / "o"))
    assert code == 2 and "validation loss became NaN" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o" / "ckpt.pt").exists()


def test_alpha_at_its_floor_is_warned_once():
    said = []
    log = rundir.RunLog(said.append)
    log({"kind": "start", "step": 0, "max_steps": 9, "resumed": False, "out_dir": "/tmp/nanoebt-test-runlog",
         "model": "ebt", "parameters": 1, "device": "cpu", "world": 1, "tokens_per_step": 1, "time": 0.0})
    for step, alpha in ((1, 2.0), (2, 0.001), (3, 0.001)):
        log({"kind": "train", "step": step, "loss": 1.0, "loss_first": 1.0, "loss_last": 1.0, "energy_first": 0.0,
             "energy_last": 0.0, "step_size": alpha, "time": float(step)})
    assert sum("alpha sits at its floor" in line for line in said) == 1 and "floor" in said[-2]


def test_progress_lines_are_flushed_when_output_goes_to_a_pipe(tmp_path, monkeypatch):
    """Under nohup or with output to a file the log used to be block-buffered: nothing for minutes.
    Every line must reach the stream's flush as it is printed."""
    class Stream(io.StringIO):
        unflushed = lines = 0

        def write(self, text):
            self.unflushed += text.count("\n")
            return super().write(text)

        def flush(self):
            self.lines += self.unflushed
            self.unflushed = 0
    stream = Stream()
    monkeypatch.setattr(sys, "stdout", stream)
    train_text.main([*TINY, "--max_steps", "3", "--out_dir", str(tmp_path / "out")])
    assert stream.lines >= 5 and stream.unflushed == 0, stream.getvalue()


# -----------------------------------------------------------------------------
# Run folders, locks and stopping

def test_the_same_command_twice_refuses_and_keeps_the_first_run(tmp_path):
    argv = [*TINY, "--out_dir", str(tmp_path / "out")]
    assert run_cli(train_text.main, *argv)[0] == 0
    before = {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()}
    code, _, err = run_cli(train_text.main, *argv)
    assert code == 2 and "--resume" in err and "--out_dir" in err and err.count("\n") == 1
    assert {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()} == before


def test_a_folder_in_use_refuses_a_second_run_and_is_left_untouched(tmp_path, text_file):
    out = tmp_path / "o"
    with rundir.lock_out_dir(out):  # another run holds it (flock: another open file, as another process would)
        for extra in ([], ["--resume"]):
            code, _, err = run_cli(train_text.main, *TINY, "--data", str(text_file), "--out_dir", str(out), *extra)
            assert code == 2 and f"{out} is in use by another run (process {os.getpid()})" in err, err
        code, _, err = run_cli(train_image.main, *TINY_IMAGE, "--out_dir", str(out))
        assert code == 2 and "in use" in err, err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert run_cli(train_text.main, *TINY, "--data", str(text_file), "--out_dir", str(out))[0] == 0  # released


@pytest.mark.slow
def test_a_run_owns_its_folder_until_its_process_ends_kill_9_included(tmp_path, text_file):
    out, argv = tmp_path / "o", [*TINY, "--data", str(text_file), "--max_steps", "100000", "--eval_interval", "2"]
    first = subprocess.Popen([sys.executable, "train_text.py", *argv, "--out_dir", str(tmp_path / "o")], cwd=HERE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step([first], out / "metrics.jsonl", 3)
        for extra in ([], ["--resume"]):
            r = run_script("train_text.py", *argv, "--out_dir", str(out), *extra)
            assert r.returncode == 2 and "is in use by another run" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    finally:
        first.kill()  # kill -9: the claim goes with the process
        first.wait()
    step = rundir.load_checkpoint(out / "ckpt.pt")["step"]
    r = run_script("train_text.py", *argv[:-4], "--max_steps", str(step + 2), "--out_dir", str(out), "--resume")
    assert r.returncode == 0 and rundir.load_checkpoint(out / "ckpt.pt")["step"] == step + 2, r.stderr


def test_a_stop_signal_ends_training_after_its_step_saved(tmp_path):
    """Ctrl-C or SIGTERM while train() listens only asks it to stop (cli.stop): the step ends, is saved, and
    training raises KeyboardInterrupt (exit code 130); outside train(), or a second Ctrl-C, stops at once."""
    _, data = words_data()

    class SignalDuring(rundir.Run):  # as if the signal landed while the log drew its plot, mid-step
        def show(self, record):
            super().show(record)
            if record["kind"] == "train" and record["step"] == 3:
                cli.stop(signal.SIGTERM, None)
                cli.stop(signal.SIGTERM, None)  # torchrun's SIGTERM after the terminal's: still the same orderly stop
    with pytest.raises(KeyboardInterrupt):
        ebt.train(ebt.build_model(config(vocab_size=VOCAB)), data, train_config(tmp_path, max_steps=50, eval_interval=100),
                  SignalDuring(tmp_path / "out", say=quiet))
    assert rundir.load_checkpoint(tmp_path / "out" / "ckpt.pt")["step"] == 3 and not rundir.stop_listening
    with pytest.raises(KeyboardInterrupt):  # not training: at once
        cli.stop(signal.SIGINT, None)
    rundir.stop_listening, rundir.stop_requested = True, True
    try:
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C: at once
            cli.stop(signal.SIGINT, None)
    finally:
        rundir.stop_listening = rundir.stop_requested = False


def test_sigterm_saves_like_ctrl_c_and_a_stale_temporary_file_is_removed(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "train_text.py", *TINY, "--max_steps", "100000", "--eval_interval",
                             "100000", "--out_dir", str(out)], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    while line and not line.startswith("step 3/"):
        line = proc.stdout.readline()
    assert line, "training ended before step 3"
    proc.terminate()  # SIGTERM, what schedulers send
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted at step" in rest
    assert err.startswith("stopping after this step, saving"), err  # said at once: a step may take minutes
    step = rundir.load_checkpoint(out / "ckpt.pt")["step"]
    assert step >= 3
    (out / "ckpt.pt.tmp").write_bytes(b"half a checkpoint")  # what a crash during a save leaves
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "st')  # a line torn by a crash mid-write
    resume = lambda max_steps: run_cli(train_text.main, "--resume", "--out_dir", str(out), "--max_steps",
                                       str(max_steps), "--device", "cpu")
    code, stdout, err = resume(step)  # nothing to train, so nothing saved: only the start removes the file
    assert code == 0 and "nothing to train" in stdout, err
    assert not (out / "ckpt.pt.tmp").exists()
    code, _, err = resume(step + 1)
    assert code == 0, err
    assert rundir.load_checkpoint(out / "ckpt.pt")["step"] == step + 1
    assert [r["step"] for r in rundir.read_records(out / "metrics.jsonl") if r["kind"] == "train"][-2:] == [step, step + 1]


def test_flags_read_only_with_eval_warn_without_it(checkpoints):
    code, _, err = run_cli(sample.main, "--ckpt", str(checkpoints["ebt"]), "--num_tokens", "2", "--device", "cpu",
                           "--data", "nan", "--ood", "-1", "--windows", "3")
    assert code == 0 and "warning: --data, --ood, --windows are read only with --eval: ignored" in err, err
    import bench
    code, _, err = run_cli(bench.main, "--seconds=5", "--only", "no:1")  # refused after the warning
    assert code == 2 and "warning: --seconds is read only with --gpu_check" in err, err


def test_ctrl_c_in_sample_is_one_line(checkpoints, monkeypatch):
    monkeypatch.setattr(ebt, "generate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _, err = run_cli(sample.main, "--ckpt", str(checkpoints["ebt"]), "--device", "cpu")
    assert code == 130 and err == "interrupted\n"


STOPS = [("SIGINT", 130, "interrupted\n"), ("SIGTERM", 143, "terminated\n")]


@pytest.mark.parametrize("driver", ["train_text.py", "train_image.py", "sample.py", "bench.py", "results.py",
                                    "data/prepare.py"])
@pytest.mark.parametrize("signame, code, line", STOPS)
def test_a_stop_signal_while_torch_loads_is_one_line(driver, tmp_path, signame, code, line):
    """A numpy that signals its own import: Ctrl-C or SIGTERM lands while the driver's libraries load."""
    (tmp_path / "numpy.py").write_text(f"import os, signal\nos.kill(os.getpid(), signal.{signame})\n")
    r = subprocess.run([sys.executable, str(HERE / driver), "--help"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert (r.returncode, r.stderr) == (code, line)


@pytest.mark.parametrize("signame, code, line", STOPS)
def test_a_stop_signal_at_start_up_is_one_line_and_after_the_work_no_traceback(monkeypatch, signame, code, line):
    """Before training listens (reading the data, building the model) a signal stops at once, in one line; once
    main() has done its work (a corpus prepared), one that lands while the driver ends exits 0, no traceback."""
    kill = lambda *a, **k: os.kill(os.getpid(), getattr(signal, signame))
    assert run_cli(lambda argv: kill()) == (code, "", line)
    monkeypatch.setattr(rundir, "leave_process_group", kill)
    assert run_cli(lambda argv: None) == (0, "", "")


# -----------------------------------------------------------------------------
# Text data: Tiny Shakespeare, tokenizers and your own corpus

def test_tiny_shakespeare_ships_with_the_project_is_the_default_and_is_checked(tmp_path, monkeypatch):
    text, corpus = gzip.decompress(SHAKESPEARE.read_bytes()).decode(), prepare.corpus(say=quiet)
    assert corpus.tokenizer.decode(np.concatenate([corpus.train, corpus.val]).tolist()) == text
    damaged = tmp_path / "tinyshakespeare.txt.gz"
    damaged.write_bytes(gzip.compress(text.replace("ROMEO", "JULIET", 1).encode()))
    monkeypatch.setattr(prepare, "SHAKESPEARE", damaged)
    with pytest.raises(ebt.UsageError, match="checksum"):
        prepare.corpus(say=quiet)


def test_offline_download_names_the_data_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(images.urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(ebt.UsageError, match="--data"):
        images.download("https://example.com/corpus.txt", tmp_path / "ts.txt")
    assert not (tmp_path / "ts.txt").exists()


def test_character_arrays_encode_as_encode_does_on_both_paths():
    tok = CharTokenizer(sorted(set("abc ä\n")))
    for text in ("ab c\na", "ä bc\n"):  # ASCII (translated as bytes) and not (a table of code points)
        assert tok.encode_array(text).tolist() == tok.encode(text)
    for text in ("abz", "äz"):
        with pytest.raises(ebt.UsageError, match="'z'"):
            tok.encode_array(text)
    wide = CharTokenizer([chr(i) for i in range(300)])  # 255 characters or more: ASCII by the table too
    assert wide.encode_array("az").tolist() == [97, 122] and prepare.code_points("ba").tolist() == [97, 98]


def test_gpt2_tokenizer_without_its_files_is_a_one_line_error(tmp_path, monkeypatch):
    import tiktoken
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(OSError("network unreachable")))
    code, _, err = run_cli(train_text.main, "--tokenizer", "gpt2", "--device", "cpu", "--out_dir", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1 and "--tokenizer char" in err and "network unreachable" in err, err


def small_bpe():
    """A BPE tiktoken.Encoding built here, offline: the 256 bytes, a few merges, GPT-2's pre-tokenizer."""
    import tiktoken
    ranks = {bytes([i]): i for i in range(256)}
    for merged in (b"th", b"the", b" t", b" the", b"at", b" c", b" cat", b"an", b" s", b" sat", b"og", b" d", b" dog"):
        ranks[merged] = len(ranks)
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return tiktoken.Encoding(name="gpt2", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": len(ranks)})


@pytest.fixture
def offline_bpe(monkeypatch):
    """--tokenizer gpt2 through a small BPE built here: tiktoken's real files are never fetched."""
    import tiktoken
    enc = small_bpe()
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: enc)
    return enc


def test_gpt2_tokenizer_round_trip_and_long_texts_encode_as_the_whole(offline_bpe):
    tok = GPT2Tokenizer()
    text = ("the cat sat\n\n  on the dog.\nthe end\n" * 300)[:-1]
    assert tok.vocab_size == offline_bpe.n_vocab and tok.decode(tok.encode(text)) == text
    assert tok.encode_array(text, piece=50).tolist() == offline_bpe.encode_ordinary(text)  # cut where BPE cuts


def test_prepare_streams_characters_and_bpe_into_token_files_as_the_whole_text_encodes(tmp_path, monkeypatch,
                                                                                         offline_bpe):
    """Small chunks, so that every boundary is crossed: the ids are the whole text's, the last tenth validates,
    and the record names the sources by checksum."""
    monkeypatch.setattr(prepare, "CHUNK", 997)
    texts = ["the cat sät\n\n on the dog ✓\n" * 200, "a dog ran far away\n  the end\n" * 100]
    for i, text in enumerate(texts):
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / f"{i}.txt").write_text(text)
    whole = "".join(texts)
    for kind, expected in (("char", CharTokenizer(sorted(set(whole))).encode(whole)), ("gpt2", None)):
        expected = expected or offline_bpe.encode_ordinary(texts[0]) + offline_bpe.encode_ordinary(texts[1])
        code, out, err = run_cli(prepare.main, str(tmp_path / "src"), "--out_dir", str(tmp_path / kind), "--tokenizer", kind)
        assert code == 0 and "MB/s" in out and not err, err
        corpus = prepare.Corpus(tmp_path / kind)
        assert np.concatenate([corpus.train, corpus.val]).tolist() == expected
        assert len(corpus.val) == len(expected) // 10 and corpus.train.dtype == np.uint16
        assert [s["sha256"] for s in corpus.meta["sources"]] == [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    code, _, err = run_cli(prepare.main, str(tmp_path / "src" / "*.txt"), "--out_dir", str(tmp_path / "char"))
    assert code == 2 and "--overwrite" in err, err  # a second prepare into the same place refuses
    assert run_cli(prepare.main, str(tmp_path / "src" / "*.txt"), "--out_dir", str(tmp_path / "char"), "--overwrite")[0] == 0


def folder_bytes(folder):
    """Every file of a folder and its bytes, hidden siblings' included: what a prepare may have touched."""
    return {str(p.relative_to(folder.parent)): p.read_bytes() for p in sorted(folder.parent.rglob("*")) if p.is_file()}


def fail_with(error):
    def failing(*a, **k):
        yield np.arange(5)
        raise error
    return failing


def rename_interrupted_at(call):
    """os.rename that a Ctrl-C stops at its call-th call (counting from 1)."""
    calls, rename = [], os.rename
    def interrupted(*args):
        calls.append(args)
        if len(calls) == call:
            raise KeyboardInterrupt
        return rename(*args)
    return interrupted


@pytest.mark.parametrize("failure", ["not text past its start", "full disk", "interrupted", "interrupted mid-swap",
                                     "killed (kill -9) earlier", "killed (kill -9) mid-swap"])
def test_a_prepared_folder_changes_only_as_a_whole(tmp_path, monkeypatch, text_file, failure):
    """An --overwrite that fails (a source that is not text, a full disk, Ctrl-C, even between the swap's two
    renames) leaves the folder byte for byte as it was. A process killed mid-way leaves hidden siblings: the next
    prepare puts back a corpus a swap left outside, and its successful end leaves none (another tool's file
    carried over)."""
    out = tmp_path / "data" / "p"
    prepare.prepare(text_file, out, say=quiet)
    (out / "notes.txt").write_text("someone's notes")
    before = folder_bytes(out)
    source = tmp_path / "new.txt"
    source.write_text("new text " * 20000 + ("\x00" if failure == "not text past its start" else ""))
    if failure in ("full disk", "interrupted"):
        monkeypatch.setattr(prepare, "encoded", fail_with(
            OSError(errno.ENOSPC, "No space left on device") if failure == "full disk" else KeyboardInterrupt()))
    monkeypatch.setattr(os, "rename", rename_interrupted_at(2 if failure == "interrupted mid-swap" else 0))
    if failure == "killed (kill -9) earlier":
        shutil.copytree(out, out.parent / ".p.prepare-99999999")
        (out.parent / ".p.old-99999999").mkdir()
        (out.parent / ".p.old-99999999" / "kept.txt").write_text("carried over")
    if failure == "killed (kill -9) mid-swap":  # out renamed away, the new corpus not yet in: the next prepare restores
        shutil.move(out, out.parent / ".p.old-99999999")
        code, _, err = run_cli(prepare.main, str(source), "--out_dir", str(out))
        assert code == 2 and "already holds a prepared corpus" in err and folder_bytes(out) == before, err
    elif failure != "killed (kill -9) earlier":
        code, _, err = run_cli(prepare.main, str(source), "--out_dir", str(out), "--overwrite")
        assert code == (130 if failure.startswith("interrupted") else 2) and err.count("\n") == 1, err
        assert "no space left on" in err and "MB needed" in err if failure == "full disk" else True, err
        assert folder_bytes(out) == before
    monkeypatch.undo()
    source.write_text("new text " * 2000)
    assert run_cli(prepare.main, str(source), "--out_dir", str(out), "--overwrite")[0] == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["p"]  # no temporary sibling left
    assert prepare.Corpus(out).meta["sources"][0]["path"] == str(source) and (out / "notes.txt").exists()
    assert (out / "kept.txt").exists() == (failure == "killed (kill -9) earlier")


@pytest.mark.parametrize("case, out, overwrite, says", [
    ("the source is the out_dir", "src", True, "outside the sources"),
    ("the source holds the out_dir", "src/p", True, "outside the sources"),
    ("nanoGPT's token files", "gpt", False, "meta.pkl, train.bin, val.bin"),
    ("a prepared corpus", "prepared", False, "already holds a prepared corpus")])
def test_prepare_never_reads_its_own_output_nor_writes_a_folder_not_its_own_without_overwrite(tmp_path, case, out,
                                                                                               overwrite, says):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text(synthetic_text())
    prepare.prepare(tmp_path / "src" / "a.txt", tmp_path / "prepared", say=quiet)
    (tmp_path / "gpt").mkdir()
    for name in ("meta.pkl", "train.bin", "val.bin"):
        (tmp_path / "gpt" / name).write_bytes(b"nanoGPT's")
    before = folder_bytes(tmp_path / "src")
    code, _, err = run_cli(prepare.main, str(tmp_path / "src"), "--out_dir", str(tmp_path / out),
                           *["--overwrite"] * overwrite)
    assert code == 2 and says in err and err.count("\n") == 1, err
    assert folder_bytes(tmp_path / "src") == before
    if case == "nanoGPT's token files":  # --overwrite replaces the token files, and keeps the rest
        assert run_cli(prepare.main, str(tmp_path / "src"), "--out_dir", str(tmp_path / out), "--overwrite")[0] == 0
        assert (tmp_path / "gpt" / "meta.pkl").read_bytes() == b"nanoGPT's" and prepare.Corpus(tmp_path / "gpt").train.size


def prepare_process(source, out, *flags):
    return subprocess.Popen([sys.executable, str(HERE / "data" / "prepare.py"), str(source), "--out_dir", str(out),
                             *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("case", ["another prepare holds the folder", "the cache waits for it",
                                  "two processes, two sources", "two processes, one source, --overwrite"])
def test_concurrent_prepares_refuse_in_one_line_or_end_with_one_consistent_corpus(tmp_path, monkeypatch, case):
    texts = [synthetic_text(30000, seed) for seed in (0, 1)]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text)
    out = tmp_path / "p"
    if case == "another prepare holds the folder":  # the OS lock, as a second process meets it
        with prepare.locked(out, wait=False):
            code, _, err = run_cli(prepare.main, str(tmp_path / "0.txt"), "--out_dir", str(out))
        assert code == 2 and "being prepared by another process" in err and err.count("\n") == 1, err
        assert list(out.iterdir()) == []
        return
    if case == "the cache waits for it":  # a torchrun rank waits while another prepares, then reads its corpus
        monkeypatch.setenv("NANOEBT_CACHE", str(tmp_path / "cache"))
        first, said = prepare.corpus(tmp_path / "0.txt", say=quiet), []
        folder = first.folder
        with prepare.locked(folder, wait=False):
            waiting = __import__("threading").Thread(target=lambda: said.append(prepare.corpus(tmp_path / "0.txt")))
            waiting.start()
            time.sleep(0.5)
            assert waiting.is_alive()  # waits on the lock
        waiting.join(60)
        assert said[0].id == first.id
        return
    sources = [tmp_path / "0.txt", tmp_path / ("1.txt" if case == "two processes, two sources" else "0.txt")]
    procs = [prepare_process(src, out, *["--overwrite"] * ("--overwrite" in case)) for src in sources]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert any(code == 0 for code, _ in results), results
    for code, err in results:
        assert code == 0 or (code == 2 and err.count("\n") == 1 and ("another process" in err or "already" in err)), err
    corpus = prepare.Corpus(out)  # whole: meta.json agrees with both token files, and with one of the sources
    text = (tmp_path / Path(corpus.meta["sources"][0]["path"]).name).read_text()
    assert corpus.tokenizer.decode(np.concatenate([corpus.train, corpus.val]).tolist()) == text
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_cached_text_is_prepared_again_when_it_changes_and_says_why(tmp_path, monkeypatch):
    """Rewritten with other text of the same size, its modification time set back: the cache notices (the content's
    hash, ctime) and prepares it again, in one line; unchanged, it is read as it was."""
    monkeypatch.setenv("NANOEBT_CACHE", str(tmp_path / "cache"))
    path, said = tmp_path / "t.txt", []
    path.write_text("the cat sat\n" * 500)
    first = prepare.corpus(path, say=quiet)
    assert prepare.corpus(path, say=said.append).id == first.id and said == []
    stat = path.stat()
    path.write_text("the dog ran\n" * 500)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = prepare.corpus(path, say=said.append)
    assert again.id != first.id and "changed since it was prepared (ctime, content)" in said[0], said
    assert again.tokenizer.decode(again.train[:11].tolist()) == "the dog ran"
    assert len(list((tmp_path / "cache").iterdir())) == 1  # in place: a changed text leaves no stale copy
    monkeypatch.setenv("NANOEBT_CACHE", "")
    with pytest.raises(ebt.UsageError, match="NANOEBT_CACHE is set but empty"):
        prepare.corpus(path)


def damage_meta(**fields):
    return lambda d: (d / "meta.json").write_text(json.dumps({**json.loads((d / "meta.json").read_text()), **fields}))


def halve_counts(d):
    meta = json.loads((d / "meta.json").read_text())
    damage_meta(dtype="uint32", tokens={k: v // 2 for k, v in meta["tokens"].items()})(d)
    for s in ("train", "val"):  # files of an even number of uint16 ids, so that the sizes agree
        os.truncate(d / f"{s}.bin", meta["tokens"][s] // 2 * 4)


DAMAGED_META = [  # (case, damage, what the one line says)
    ("counts as text", damage_meta(tokens={"train": "10", "val": "2"}), "token counts"),
    ("a negative count", damage_meta(tokens={"train": -1, "val": 2}), "token counts"),
    ("no counts", damage_meta(tokens=None), "token counts"),
    ("an unknown dtype", damage_meta(dtype="float32"), "dtype 'float32'"),
    ("uint32 with halved counts", halve_counts, "past meta.json's vocabulary"),
    ("vocabulary as text", damage_meta(vocab_size="14"), "vocabulary of '14'"),
    ("vocabulary 0", damage_meta(vocab_size=0), "vocabulary of 0"),
    ("characters cut short", lambda d: damage_meta(tokenizer={"kind": "char", "chars": " acdefg"}, vocab_size=7)(d),
     "past meta.json's vocabulary"),
    ("characters cut short, vocabulary kept", damage_meta(tokenizer={"kind": "char", "chars": " acdefg"}), "vocab_size"),
    ("every id 65535", lambda d: np.full(os.path.getsize(d / "train.bin") // 2, 65535, np.uint16).tofile(d / "train.bin"),
     "id 65,535"),
    ("a char tokenizer without characters", damage_meta(tokenizer={"kind": "char"}), "tokenizer"),
    ("an unknown tokenizer", damage_meta(tokenizer={"kind": "sentencepiece"}), "sentencepiece"),
    ("no id", damage_meta(id=None), "no id"),
    ("not a record", lambda d: (d / "meta.json").write_text("[1, 2]"), "format"),
    ("not JSON", lambda d: (d / "meta.json").write_text('{"tokens": '), "damaged"),
]


@pytest.mark.parametrize("case, damage, says", DAMAGED_META, ids=[c[0] for c in DAMAGED_META])
def test_a_damaged_meta_json_is_one_line_naming_the_file_before_the_first_batch(tmp_path, text_file, case, damage, says):
    prepare.prepare(text_file, tmp_path / "p", say=quiet)
    damage(tmp_path / "p")
    with pytest.raises(ebt.UsageError) as e:
        prepare.corpus(tmp_path / "p")
    assert says in str(e.value) and str(tmp_path / "p") in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_folders_and_globs_recurse_in_order_skipping_what_is_not_text(tmp_path):
    """Subfolders too, sorted; hidden files, empty ones and those that are not text are left out, with a count; the
    log names how many files and bytes were prepared."""
    import matplotlib.image
    src = tmp_path / "src"
    for name, text in (("b/z.txt", "zz\n"), ("a.txt", "aa\n"), ("b/c/d.py", "dd\n"), ("b/empty.py", ""),
                       (".git/config", "hidden\n")):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    matplotlib.image.imsave(src / "b" / "plot.png", np.zeros((4, 4, 3)))
    said = []
    assert [p.relative_to(src).as_posix() for p in prepare.sources_of(src, said.append)] == ["a.txt", "b/c/d.py", "b/z.txt"]
    assert said == [f"skipped 2 of 5 files, empty or not UTF-8 text (the first: {src / 'b' / 'empty.py'})"], said
    assert [p.name for p in prepare.sources_of(f"{src}/**/*.py", quiet)] == ["d.py"]
    meta = prepare.prepare(src, tmp_path / "p", say=said.append)
    assert f"prepared {tmp_path / 'p'} from 3 files, 0.0 MB" in said[-1] and len(meta["sources"]) == 3


def test_rare_characters_read_as_one_unknown_character_unless_kept(tmp_path):
    """Past MAX_CHARS characters, those seen fewer than RARE times are one token, with a warning; --keep_rare keeps
    each. Tiny Shakespeare, 65 characters, keeps all of its own."""
    rare = "".join(chr(0x4E00 + i) for i in range(prepare.MAX_CHARS))  # each once
    (tmp_path / "t.txt").write_text(synthetic_text() * 10 + rare)
    said = []
    prepare.prepare(tmp_path / "t.txt", tmp_path / "p", say=said.append)
    merged = prepare.Corpus(tmp_path / "p")
    assert merged.tokenizer.vocab_size == VOCAB + 1 and merged.tokenizer.unknown == prepare.UNKNOWN
    assert any(f"{prepare.MAX_CHARS:,} of the {VOCAB + prepare.MAX_CHARS:,} characters, outside ASCII, are seen" in line
               for line in said), said
    assert merged.tokenizer.decode(merged.val[-3:].tolist()) == prepare.UNKNOWN * 3
    code, _, _ = run_cli(prepare.main, str(tmp_path / "t.txt"), "--out_dir", str(tmp_path / "kept"), "--keep_rare")
    assert code == 0 and prepare.Corpus(tmp_path / "kept").tokenizer.vocab_size == VOCAB + prepare.MAX_CHARS
    assert prepare.corpus().tokenizer.vocab_size == 65 and prepare.corpus().tokenizer.unknown is None


def test_bpe_prepare_train_resume_sample_and_eval_offline(tmp_path, offline_bpe, text_file, capsys):
    """--tokenizer gpt2 end to end with a BPE built here: prepare, train, resume, sample, --eval; another corpus is
    refused by its prepared id."""
    corpus = tmp_path / "bpe"
    assert run_cli(prepare.main, str(text_file), "--out_dir", str(corpus), "--tokenizer", "gpt2")[0] == 0
    out = tmp_path / "run"
    common = [*TINY, "--data", str(corpus), "--out_dir", str(out)]
    code, _, err = run_cli(train_text.main, *common, "--max_steps", "2")
    assert code == 0, err
    ckpt = rundir.load_checkpoint(out / "ckpt.pt")
    assert ckpt["data"]["id"] == prepare.Corpus(corpus).id and ckpt["model_config"]["vocab_size"] == offline_bpe.n_vocab
    code, _, err = run_cli(train_text.main, *common, "--max_steps", "4", "--resume")
    assert code == 0 and rundir.load_checkpoint(out / "ckpt.pt")["step"] == 4, err
    code, text, err = run_cli(sample.main, "--ckpt", str(out / "ckpt.pt"), "--prompt", "the cat", "--num_tokens", "5",
                              "--device", "cpu")
    assert code == 0 and text.startswith("the cat"), err
    code, text, err = run_cli(sample.main, "--ckpt", str(out / "ckpt.pt"), "--eval", "--windows", "2", "--device", "cpu")
    assert code == 0 and "perplexity" in text, err
    (tmp_path / "other.txt").write_text(synthetic_text(seed=1))
    code, _, err = run_cli(train_text.main, *common[:-4], "--data", str(tmp_path / "other.txt"), "--tokenizer", "gpt2",
                           "--out_dir", str(out), "--max_steps", "6", "--resume")
    assert code == 2 and "not the corpus" in err and err.count("\n") == 1, err


# -----------------------------------------------------------------------------
# The drivers end to end

def test_train_text_runs_end_to_end_and_resumes(text_file, tmp_path):
    """As a user runs it (a process), then resumed."""
    common = [*TINY, "--data", str(text_file), "--out_dir", str(tmp_path / "o")]
    r = run_script("train_text.py", *common, "--max_steps", "2")
    assert r.returncode == 0, r.stderr
    assert f"val loss after 1..{ebt.THINK_LONGER * 2} thinking steps" in r.stdout  # S1 thinks longer than its 2
    code, stdout, err = run_cli(train_text.main, *common, "--max_steps", "4", "--resume")
    assert code == 0, err
    assert "resumed from" in stdout and "step 3/4" in stdout and "step 1/" not in stdout
    for f in ("ckpt.pt", "metrics.jsonl", "loss.png"):
        assert (tmp_path / "o" / f).stat().st_size > 0


@pytest.mark.parametrize("seeds, same", [((7, 7), True), ((7, 8), False)])
def test_the_seed_fixes_the_whole_run_initial_weights_included(text_file, tmp_path, seeds, same):
    runs = []
    for i, seed in enumerate(seeds):
        train_text.main([*TINY, "--data", str(text_file), "--max_steps", "2", "--seed", str(seed), "--out_dir",
                         str(tmp_path / str(i))], log=quiet)
        runs.append(rundir.load_checkpoint(tmp_path / str(i) / "ckpt.pt")["model"])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0]) == same


def test_sample_never_emits_ids_past_its_tokenizer_and_warns_when_the_ood_text_is_mostly_unknown(tmp_path, text_file):
    assert run_cli(train_text.main, *TINY, "--max_steps", "1", "--vocab_size", "40", "--data", str(text_file),
                   "--out_dir", str(tmp_path / "o"))[0] == 0
    code, out, err = run_cli(sample.main, "--out_dir", str(tmp_path / "o"), "--num_tokens", "50", "--temperature", "5",
                             "--device", "cpu")
    assert code == 0 and len(out) >= 50 and "\ufffd" not in out, err  # 26 padded ids of 40, masked: never sampled
    (tmp_path / "ood.txt").write_text("ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 " * 200)
    code, out, err = run_cli(sample.main, "--out_dir", str(tmp_path / "o"), "--eval", "--windows", "1", "--ood",
                             str(tmp_path / "ood.txt"), "--device", "cpu")
    assert code == 0 and "warning: 95% of ood.txt is outside the model's vocabulary" in err, err


# -----------------------------------------------------------------------------
# Harnesses: bench.py, results.py and the CI

def test_bench_flop_count_is_a_counted_forward_times_three():
    """A Transformer++ step is 3 forwards: the matrix products torch's FLOP counter sees in a forward, plus
    causal attention counted by hand (query i meets i + 1 keys), which the counter leaves out."""
    import bench
    from torch.utils.flop_counter import FlopCounterMode
    B, S = 3, 32
    cfg = config(model="transformer", block_size=S)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ebt.build_model(cfg).logits(torch.randint(cfg.vocab_size, (B, S)))
    matmuls = counter.get_total_flops()
    attention = 2 * 2 * B * cfg.n_layer * cfg.n_embd * S * (S + 1) // 2  # QK^T and AV, 2 FLOPs a multiply-add
    assert matmuls > 0 and attention > 0.1 * matmuls
    assert bench.flops_per_step(cfg, B, S) == pytest.approx(3 * (matmuls + attention), rel=0.01)


@pytest.mark.parametrize("recipe", ["s1", "s2"])
def test_bench_flop_count_of_an_ebt_step_is_what_learn_multiplies(recipe):
    """An EBT's training step (TextEBT.learn) of each recipe, its matrix products counted as torch runs them:
    bench's model FLOPs plus the context stream's forward it runs again (attention, which the count leaves out, is
    ~2% at 4 positions). S2 trains its last step alone; its replay and random extra step are off: fixed counts."""
    import bench
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry
    counted = [0]

    class Count(TorchDispatchMode):  # FlopCounterMode's hooks refuse the autograd.grad inside learn
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._overloadpacket in flop_registry:
                counted[0] += flop_registry[func._overloadpacket](*args, **(kwargs or {}), out_val=out)
            return out
    B, S = 3, 4
    values = ebt.derive_thinking({**ebt.RECIPES[recipe], "vocab_size": 13, "random_steps": 0, "replay_size": 0})
    cfg = config(block_size=S, **{k: v for k, v in values.items() if k in ebt.ModelConfig.__dataclass_fields__})
    model, idx = ebt.build_model(cfg), torch.randint(13, (B, S))
    with Count():
        model.learn(idx, idx, 1.0)
    recompute = 2 * B * S * cfg.n_layer * (4 * cfg.n_embd ** 2 + 3 * cfg.n_embd * cfg.mlp_hidden)
    assert counted[0] == pytest.approx(bench.flops_per_step(cfg, B, S) + recompute, rel=0.05)
    assert bench.flops_per_step(dataclasses.replace(cfg, replay_size=8), B, S) == 1.5 * bench.flops_per_step(cfg, B, S)


@pytest.mark.parametrize("one, s2", [("transformer:0", False), ("ebt:2", False), ("ebt:3", True), ("image_ebt:1", False),
                                     ("image_dit:0", False)])
def test_bench_measures_a_training_step_of_each_configuration(one, s2):
    import argparse
    import bench
    args = argparse.Namespace(device="cpu", vocab_size=13, block_size=16, n_layer=1, n_head=2, n_embd=16,
                              batch_size=2, iters=1, warmup=1, compile=False, s2=s2, one_backward=False)
    kind, steps = one.split(":")
    row, again = bench.measure(kind, int(steps), args, rounds=range(2))
    assert again["step_s"] > 0 and row["model"] == kind and row["steps"] == int(steps) and row["step_s"] > 0 and row["tflops"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("one, sizes", [("ebt:2", []), ("transformer:0", []), ("image_ebt:1", ["--n_layer", "3",
                                        "--n_embd", "96", "--batch_size", "32"])])  # the CPU preset, train_image's size
def test_the_memory_estimate_is_within_30_percent_of_the_peak_bench_measures(one, sizes):
    import bench
    argv = ["--device", "cpu", *sizes, "--iters", "1", "--warmup", "0"]
    measured, = bench.measure_alternating([one], argv, 1, env=bench.allocated_memory_env())
    assert 0.7 < measured["estimate_mb"] / measured["peak_mb"] < 1.3, measured


def test_results_of_other_settings_never_overwrite_the_shipped_report(tmp_path):
    import results
    assert results.parse_args(["--seeds", "1", "--out_dir", str(tmp_path)]).report_dir == str(tmp_path / "report")


@pytest.mark.slow
def test_results_trains_what_is_missing_then_reports_from_checkpoints(tmp_path, monkeypatch, capsys):
    import results
    monkeypatch.setitem(train_text.PRESETS, "cpu", dict(
        n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_steps=2, lr=3e-3,
        eval_interval=2, eval_batches=1, log_interval=1))
    tiny_image = [*TINY_IMAGE[:6], "--max_steps", "2", "--eval_interval", "2", "--eval_batches", "1", "--batch_size",
                  "4", "--report_steps", "2", "--passes", "1", "2", "--dataset", "grace_hopper"]
    monkeypatch.setattr(results, "IMAGE_RUNS", {k: v + tiny_image for k, v in results.IMAGE_RUNS.items()})
    monkeypatch.setattr(train_image, "DIT_PASSES", (1, 2))
    monkeypatch.setattr(results, "TASK_DATA", tmp_path)
    monkeypatch.setattr(results, "TASK_LENGTH", 2)
    monkeypatch.setattr(results, "TASK_PROBLEMS", 8)
    monkeypatch.setitem(results.TASKS, "ordinary", (*results.TASKS["ordinary"][:3], (1, 2)))  # 2: the Transformer++'s
    write = results.addition.write
    monkeypatch.setattr(results.addition, "write", lambda out_dir, **task: write(
        out_dir, **{**task, "digits": 2}, n_train=3000, n_eval=100))
    argv = ["--seeds", "1", "2", "--lengths", "3", "--out_dir", str(tmp_path), "--report_dir", str(tmp_path),
            "--windows", "2", "--device", "cpu"]
    results.main(argv)
    # every model and baseline at both seeds, the same on each task and the ordinary sums' learning curve (1 step
    # new), the image runs
    assert capsys.readouterr().out.count("$ python ") == (len(results.RUNS) + 3) * 2 * 3 + 2 + len(results.IMAGE_RUNS)
    report = (tmp_path / "results.md").read_text()
    assert report.index("## Tiny Shakespeare") < report.index("## The addition task") < report.index("## Sums in the")
    for section in ("T1. Teacher forcing", "T2. Thinking longer", "T3. Does the energy verify", "T4. What each",
                    "T5. Adaptive stopping", "| Transformer++ = S2 FLOPs | ", "| Transformer++, 8 layers | "):
        assert all(section in task for task in report.split("## The addition task")[1].split("## Sums in the")), section
    sums_t1 = report.split("## Sums in the")[1].split("T2. ")[0]  # T1 holds the learning curve, each run once
    assert "| Transformer++, 1 steps | 0.50x |" in sums_t1 and "| Transformer++, 2 steps |" not in sums_t1
    sums = json.loads((tmp_path / "ordinary.json").read_text())
    assert sums["Transformer++, 2 steps|1"] == sums["Transformer++|1"] and sums["S1|1"]["flops"] > 4.9 * sums["Transformer++|1"]["flops"]
    assert "long carry" in sums["S2|2"]["val"]["adaptive"]["0.01"]
    task = json.loads((tmp_path / "task.json").read_text())
    assert sorted(task["S2|1"]["ood"]["steps"]) == ["1", "12", "3", "6"] and list(task["Transformer++|2"]["val"]["steps"]) == ["1"]
    assert 0 <= task["S1|2"]["val"]["best of"]["oracle"]["16"]["acc"] <= 1 and (tmp_path / "task.png").stat().st_size > 0
    for section in ("1. Learning", "2. Thinking longer", "3. What thinking more changes", "4. Does the energy rank",
                    "5. FLOPs a training step"):
        assert section in report
    assert "| 12 | " in report and "| S1 | 3 | " in report and "| 3 | S2 OOD | " in report
    for f in ("gap.png", "thinking_steps.png", "candidates.png", "gains.png", "verifier.png", "image/psnr.png",
              "image/psnr.md", "flops.png", "task_flops.png", "ordinary.png", "ordinary_flops.png"):
        assert (tmp_path / f).stat().st_size > 0
    curves = json.loads((tmp_path / "results.json").read_text())
    assert curves["S2|3|1"]["trained"] == 3 and curves["S1|3|1"]["trained"] == 2
    assert curves["S1|3|1"]["val"]["steps"]["1"] != curves["S1|3|1"]["val"]["steps"]["2"]
    assert -1 <= curves["S2|3|2"]["ood"]["verifier"]["correlation"] <= 1 and "verifier" not in curves["Transformer++|3|1"]["val"]
    step3 = next(row for row in report.split("2. Thinking longer")[1].splitlines() if row.startswith("| 3 | "))
    ce3 = (curves["S1|3|1"]["val"]["steps"]["3"] + curves["S1|3|2"]["val"]["steps"]["3"]) / 2  # the steps curve's
    assert step3.split(" | ")[1].startswith(f"{ce3:.3f} / "), step3
    results.main(argv)  # everything is trained now: only the report is made again
    assert "$ python " not in capsys.readouterr().out
    assert (tmp_path / "results.md").read_text() == report
    results.main([*argv, "--part", "task"])  # one part: its section made again, the others kept
    assert (tmp_path / "results.md").read_text() == report
    with pytest.raises(ebt.UsageError, match="other settings"):  # runs of another preset are not reused
        results.main([*argv, "--preset", "gpu"])


def test_addition_problems_read_their_answers_and_carries_as_by_hand():
    """95 + 17 = 112, written 211: no carry into the units, one into the tens (5 + 7) and the hundreds (95 + 17);
    in the ordinary order the same carries, read the other way."""
    import results
    tok = CharTokenizer(sorted(set("0123456789+=\n")))
    for ordinary, written, chain in ((False, "211", [0, 1, 1, 0]), (True, "112", [1, 1, 0, 0])):
        text = "1+1=2\n" * 20 + f"95+17={written}\n"
        p = results.task_problems(text, tok, 16, 100, ordinary)
        last = {k: v[-1] for k, v in p.items()}
        assert p["answers"][-1] == written + "\n" and tok.decode(last["y"][last["answer"]].tolist()) == written + "\n"
        assert last["chain"][last["answer"]].tolist() == chain
        assert tok.decode(last["prompts"].tolist()).endswith("95+17=") and len(last["prompts"]) == 6
        assert tok.decode(last["x"].tolist()) + "\n" == text[-17:] and not last["chain"][~last["answer"]].any()


def test_addition_writes_sums_either_way_from_a_seed_and_measures_carry_chains():
    from data import addition
    assert addition.problems(4, 0, (1, 3)) == "63+4=76\n597+48=546\n55+323=873\n242+27=962\n"  # reversed, as before
    for ordinary, order in ((False, -1), (True, 1)):
        generated = addition.problems(500, 0, (1, 3), ordinary)
        assert generated == addition.problems(500, 0, (1, 3), ordinary) != addition.problems(500, 1, (1, 3), ordinary)
        assert all(line.split("=")[1][::order] == str(eval(line.split("=")[0])) for line in generated.splitlines())
    assert addition.problems(3, 0, (1, 3), True).splitlines()[1] == "597+48=645"
    # 95 + 5 = 100: the units make a carry, the tens (9 + 0) pass it on: it comes 2 places to the hundreds
    assert addition.carry_chains(95, 5) == [0, 1, 2] and addition.carry_chains(55, 55) == [0, 1, 1]
    assert addition.carry_chains(45, 54) == [0, 0] and addition.carry_chains(999, 1) == [0, 1, 2, 3]


def test_ci_runs_the_test_command_the_readme_gives():
    commands = lambda text: {line.strip() for line in text.replace("`", "\n").splitlines()
                             if line.strip().startswith("python -m pytest")}
    ci = commands((HERE / ".ci" / "run").read_text())
    assert len(ci) == 1 and ci <= commands((HERE / "README.md").read_text()), ci


# -----------------------------------------------------------------------------
# Bad input: one line each

BAD_INPUTS = [  # (case, driver, argv: {name} is a path of the bad_input_files fixture, what the one line says)
    ("missing data", "text", ["--data", "{tmp}/nope.txt"], "does not exist"),
    ("empty data", "text", ["--data", "{empty}"], "empty"),
    ("data shorter than a block", "text", ["--data", "{short}"], "too few for block size"),
    ("data is a folder, not prepared", "text", ["--data", "{tmp}"], "python data/prepare.py"),
    ("width not divisible by heads", "text", ["--n_embd", "30", "--n_head", "4"], "--n_embd 30"),
    ("negative lr", "text", ["--lr", "-1"], "--lr -1"),
    ("nan step size", "text", ["--step_size", "nan"], "--step_size nan"),
    ("negative noise", "text", ["--langevin_std", "-1"], "--langevin_std"),
    ("zero thinking steps", "text", ["--think_steps", "0"], "--think_steps 0"),
    ("too many thinking steps", "text", ["--think_steps", "100000"], "think_steps"),
    ("vocabulary below the tokenizer's", "text", ["--vocab_size", "3"], "smaller than the tokenizer"),
    ("abbreviated flag", "text", ["--max_step", "3"], "unrecognized arguments: --max_step"),
    ("out_dir is a file", "text", ["--out_dir", "{file}"], "is a file"),
    ("batch too large", "text", ["--batch_size", "1000000"], "lower --batch_size"),
    ("block too large", "text", ["--block_size", "100000"], "--block_size"),
    ("unavailable device", "text", ["--device", "tpu" if torch.cuda.is_available() else "cuda:7"], "device"),
    ("thinking option for the baseline", "text", ["--model", "transformer", "--step_size", "5"], "EBT option"),
    ("resume without a checkpoint", "text", ["--resume", "--out_dir", "{tmp}/none"], "does not exist"),
    ("resume a corrupt checkpoint", "text", ["--resume", "--out_dir", "{corrupt_dir}"], "corrupt"),
    ("resume as another model", "text", ["--resume", "--model", "ebt", "--out_dir", "{transformer_dir}"],
                                "--model ebt conflicts"),
    ("resume the baseline with a recipe", "text", ["--resume", "--recipe", "s2", "--out_dir", "{transformer_dir}"],
                                          "EBT option"),
    ("resume an image run as text", "text", ["--resume", "--out_dir", "{image_dir}"], "train_image.py"),
    ("sample: no checkpoint", "sample", ["--ckpt", "{tmp}/missing.pt"], "does not exist"),
    ("sample: corrupt checkpoint", "sample", ["--ckpt", "{corrupt}"], "unreadable or corrupt"),
    ("sample: checkpoint is a directory", "sample", ["--ckpt", "{tmp}"], "is a directory"),
    ("sample: characters outside the vocabulary", "sample", ["--ckpt", "{ebt}", "--prompt", "the DOG!"], "'!DGO'"),
    ("sample: plots of the baseline", "sample", ["--ckpt", "{transformer}", "--plots", "{tmp}/plots"], "needs an EBT"),
    ("sample: candidates for the baseline", "sample", ["--ckpt", "{transformer}", "--candidates", "4"], "needs an EBT"),
    ("sample: nan temperature", "sample", ["--ckpt", "{ebt}", "--temperature", "nan"], "--temperature"),
    ("sample: zero step size", "sample", ["--ckpt", "{ebt}", "--step_size", "0"], "--step_size"),
    ("sample: nan step size", "sample", ["--ckpt", "{ebt}", "--step_size", "nan"], "--step_size"),
    ("sample: negative tolerance", "sample", ["--ckpt", "{ebt}", "--tolerance", "-1"], "--tolerance"),
    ("sample: nan noise", "sample", ["--ckpt", "{ebt}", "--langevin_std", "nan"], "--langevin_std"),
    ("sample: too many steps", "sample", ["--ckpt", "{ebt}", "--steps", "100000"], "--steps"),
    ("sample: zero top_k", "sample", ["--ckpt", "{ebt}", "--top_k", "0"], "--top_k"),
    ("sample: negative init_std", "sample", ["--ckpt", "{ebt}", "--init_std", "-1"], "init_std"),
    ("sample: no windows", "sample", ["--ckpt", "{ebt}", "--eval", "--windows", "0"], "--windows"),
    ("sample: sampling flag with --eval", "sample", ["--ckpt", "{ebt}", "--eval", "--steps", "3"], "applies to sampling"),
    ("sample: plots into a file", "sample", ["--ckpt", "{ebt}", "--plots", "{file}"], "--plots"),
    ("sample: missing OOD text", "sample", ["--ckpt", "{ebt}", "--eval", "--ood", "{tmp}/nope.txt"], "--ood"),
    ("sample: abbreviated flag", "sample", ["--ckpt", "{ebt}", "--num_token", "3"], "unrecognized arguments"),
    ("image: zero crop", "image", ["--image_size", "0"], "--image_size 0"),
    ("image: noise step 0", "image", ["--noise_t", "0"], "--noise_t 0"),
    ("image: negative report steps", "image", ["--report_steps", "-1"], "--report_steps"),
    ("image: report level past the chain", "image", ["--eval_t", "2000"], "--eval_t"),
    ("image: abbreviated flag", "image", ["--max_step", "1"], "unrecognized"),
    ("image: recipe for the DiT", "image", ["--model", "dit", "--recipe", "s2"], "EBT option"),
    ("image: data is a file", "image", ["--data", "{file}"], "is a file"),
    ("image: empty folder", "image", ["--data", "{empty_dir}"], "no PNG or JPEG"),
    ("image: broken image", "image", ["--data", "{broken_dir}"], "not a readable PNG or JPEG"),
    ("image: image too small", "image", ["--data", "{small_dir}"], "too small"),
    ("image: --data and --dataset", "image", ["--data", "{small_dir}", "--dataset", "mnist"], "give one"),
    ("image: mnist offline", "image", ["--dataset", "mnist"], "could not download"),
    ("image: compare into a file", "image", ["--compare", "{image_dir}", "--out_dir", "{file}"], "is a file"),
    ("image: resume a text run", "image", ["--resume", "--out_dir", "{ebt_dir}"], "train_text.py"),
    # what a hostile user tried: numbers past any use, places that cannot be written, empty values
    ("vocabulary -1", "text", ["--vocab_size", "-1"], "smaller than the tokenizer"),
    ("seed past 64 bits", "text", ["--seed", str(2**70)], "--seed"),
    ("a billion layers", "text", ["--n_layer", "1000000000"], "cannot fit"),
    ("a billion evaluation steps", "text", ["--eval_steps", "1000000000"], "--eval_steps"),
    ("a billion evaluation batches", "text", ["--eval_batches", "1000000000"], "--eval_batches"),
    ("a billion micro-batches", "text", ["--grad_accum", "1000000000"], "--grad_accum"),
    ("alpha's learning rate x 1e30", "text", ["--step_size_lr_mult", "1e30"], "--step_size_lr_mult"),
    ("more replayed sequences than kept", "text", ["--recipe", "s2", "--replay_batch", "20"], "more than the buffer"),
    ("out_dir under a file", "text", ["--out_dir", "{file}/run"], "cannot be written"),
    ("out_dir in a read-only system folder", "text", ["--out_dir", "/proc/nanoebt-run"], "cannot be written"),
    ("empty --data value", "text", ["--data", ""], "--data is empty"),
    ("empty out_dir", "text", ["--out_dir", ""], "--out_dir is empty"),
    ("cpu:7", "text", ["--device", "cpu:7"], "not available"),
    ("resume a checkpoint without its step", "text", ["--resume", "--out_dir", "{nostep_dir}"], "holds no step"),
    ("sample: seed past 64 bits", "sample", ["--ckpt", "{ebt}", "--seed", str(2**70)], "--seed"),
    ("resume a checkpoint at a fractional step", "text", ["--resume", "--out_dir", "{fracstep_dir}"], "records step 1.5"),
    ("resume a checkpoint at a negative step", "text", ["--resume", "--out_dir", "{negstep_dir}"], "records step -3"),
    ("resume a checkpoint with a layer count as text", "text", ["--resume", "--out_dir", "{strlayers_dir}"],
     "records n_layer='1'"),
    ("sample: a tokenizer larger than its model", "sample", ["--ckpt", "{widetok}"], "not trained together"),
    ("sample: step size 1e30", "sample", ["--ckpt", "{ebt}", "--step_size", "1e30"], "--step_size"),
    ("bench: gpu check without a GPU", "bench", ["--gpu_check", "{tmp}/gpu"], "no CUDA GPU"),
    ("bench: a malformed configuration to measure", "bench", ["--one", "rnn"], "each configuration"),
    ("sample: a billion tokens", "sample", ["--ckpt", "{ebt}", "--num_tokens", "1000000000"], "--num_tokens"),
    ("sample: candidates past 64 bits", "sample", ["--ckpt", "{ebt}", "--candidates", str(2**70)], "--candidates"),
    ("sample: windows past 64 bits", "sample", ["--ckpt", "{ebt}", "--eval", "--windows", str(2**70)], "--windows"),
    ("bench: a measurement that fails", "bench", ["--only", "ebt:1", "--n_embd", "30", "--n_head", "4",
                                                  "--no_generation"], "n_embd=30"),
    ("sample: plots under a file", "sample", ["--ckpt", "{ebt}", "--plots", "{file}/plots"], "cannot be written"),
    ("sample: empty prompt", "sample", ["--ckpt", "{ebt}", "--prompt", ""], "--prompt is empty"),
    ("sample: NaN weights", "sample", ["--ckpt", "{nan}"], "not all finite"),
    ("image: out_dir under a file", "image", ["--out_dir", "{file}/run"], "cannot be written"),
    ("image: compare into a folder under a file", "image", ["--compare", "{image_dir}", "--out_dir", "{file}/x"],
                                                  "cannot be written"),
    ("image: a billion passes", "image", ["--passes", "1000000000"], "--passes"),
    ("image: a billion report steps", "image", ["--report_steps", "1000000000"], "--report_steps"),
    ("results: seed past 64 bits", "results", ["--seeds", str(2**70)], "--seeds"),
    ("results: out_dir under a file", "results", ["--out_dir", "{file}/runs"], "cannot be written"),
    ("results: report_dir under a file", "results", ["--report_dir", "{file}/report"], "cannot be written"),
    ("bench: batch 0", "bench", ["--batch_size", "0"], "--batch_size 0"),
    ("bench: a billion iterations", "bench", ["--iters", "1000000000"], "--iters"),
    ("bench: gpu check under a file", "bench", ["--gpu_check", "{file}/gpu"], "cannot be written"),
    ("bench: nan peak TFLOPS", "bench", ["--peak_tflops", "nan"], "--peak_tflops nan"),
    ("bench: no seconds", "bench", ["--seconds", "0"], "--seconds 0"),
    ("image: 2**70 layers", "image", ["--n_layer", str(2**70)], "--n_layer"),
    ("image: 2**70 wide", "image", ["--n_embd", str(2**70)], "--n_embd"),
    ("image: a batch of 2**70", "image", ["--batch_size", str(2**70)], "--batch_size"),
    ("image: 2**70 warm-up steps", "image", ["--warmup_steps", str(2**70)], "--warmup_steps"),
    ("sample: a checkpoint whose tokenizer nanoEBT does not write", "sample", ["--ckpt", "{badtok}"], "does not write"),
    # your own corpus: preparing it, and prepared folders that are not whole
    ("binary data", "text", ["--data", "{binary}"], "not UTF-8 text"),
    ("prepare: a folder with no files", "prepare", ["{empty_dir}", "--out_dir", "{tmp}/p"], "no files"),
    ("prepare: a binary file", "prepare", ["{binary}", "--out_dir", "{tmp}/p"], "not UTF-8 text"),
    ("prepare: an empty file", "prepare", ["{empty}", "--out_dir", "{tmp}/p"], "is empty"),
    ("prepare: nothing matches", "prepare", ["{tmp}/*.none", "--out_dir", "{tmp}/p"], "no such file, folder or glob"),
    ("prepare: into a file", "prepare", ["{text}", "--out_dir", "{file}"], "is a file"),
    ("prepared: a truncated token file", "text", ["--data", "{truncated_corpus}"], "missing or truncated"),
    ("prepared: a missing token file", "text", ["--data", "{nofile_corpus}"], "missing or truncated"),
    ("prepared: no meta.json", "text", ["--data", "{nometa_corpus}"], "not a prepared corpus"),
    ("prepared: a damaged meta.json", "text", ["--data", "{damaged_corpus}"], "damaged"),
    ("prepared: a vocabulary past its dtype", "text", ["--data", "{wide_corpus}"], "does not fit its token dtype"),
    ("prepared: another tokenizer asked", "text", ["--data", "{corpus}", "--tokenizer", "gpt2"], "conflicts with"),
    ("resume on another prepared corpus", "text", ["--resume", "--out_dir", "{ebt_dir}", "--data", "{other_corpus}"],
     "not the corpus"),
    ("sample: eval on another prepared corpus", "sample", ["--ckpt", "{ebt}", "--eval", "--data", "{other_corpus}"],
     "not the corpus"),
]
DRIVERS = {"text": train_text.main, "sample": sample.main, "image": train_image.main, "prepare": prepare.main,
           "results": lambda argv: __import__("results").main(argv), "bench": lambda argv: __import__("bench").main(argv)}


@pytest.fixture
def bad_input_files(tmp_path, checkpoints, text_file, monkeypatch):
    import matplotlib.image
    monkeypatch.setattr(images.urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(
        OSError("network unreachable")))  # the same with or without a network
    monkeypatch.setattr(images, "CACHE_DIR", tmp_path / "cache")
    paths = {"tmp": tmp_path, "text": text_file, **checkpoints,
             **{f"{k}_dir": p.parent for k, p in checkpoints.items() if k != "file"}}
    for name, content in (("empty", ""), ("short", "too short")):
        (tmp_path / f"{name}.txt").write_text(content)
        paths[name] = tmp_path / f"{name}.txt"
    for name in ("empty_dir", "broken_dir", "small_dir"):
        (tmp_path / name).mkdir()
        paths[name] = tmp_path / name
    (tmp_path / "broken_dir" / "broken.png").write_bytes(b"not a png")
    paths["binary"] = tmp_path / "binary.txt"
    paths["binary"].write_bytes(bytes(range(256)) * 4)
    for name, text in (("corpus", synthetic_text()), ("other_corpus", synthetic_text(seed=1))):
        (tmp_path / f"{name}.txt").write_text(text)
        prepare.prepare(tmp_path / f"{name}.txt", tmp_path / name, say=quiet)
        paths[name] = tmp_path / name
    for name, damage in (("truncated", lambda d: os.truncate(d / "train.bin", 100)),
                         ("nofile", lambda d: (d / "val.bin").unlink()),
                         ("nometa", lambda d: (d / "meta.json").unlink()),
                         ("damaged", lambda d: (d / "meta.json").write_text('{"tokens": ')),
                         ("wide", lambda d: (d / "meta.json").write_text(json.dumps(
                             {**json.loads((d / "meta.json").read_text()), "vocab_size": 70000})))):
        shutil.copytree(paths["corpus"], tmp_path / f"{name}_corpus")
        damage(tmp_path / f"{name}_corpus")
        paths[f"{name}_corpus"] = tmp_path / f"{name}_corpus"
    matplotlib.image.imsave(tmp_path / "small_dir" / "tiny.png", np.zeros((20, 20, 3)))
    return paths


def bad_input_argv(case, paths):
    _, driver, argv, _ = case
    argv = [a.format(**paths) for a in argv]
    if driver == "text":  # the data and place of a tiny run, unless the case names its own
        argv = ["--data", str(paths["text"]), "--device", "cpu", "--out_dir", str(paths["tmp"] / "run"),
                "--max_steps", "1", *argv]
    elif driver == "sample":
        argv = ["--num_tokens", "2", "--device", "cpu", *argv]
    elif driver == "image":
        argv = ["--max_steps", "1", "--device", "cpu", "--out_dir", str(paths["tmp"] / "img"), *argv]
    elif driver == "results":
        argv = ["--device", "cpu", "--out_dir", str(paths["tmp"] / "results"), *argv]
    return DRIVERS[driver], argv


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(case, bad_input_files):
    main, argv = bad_input_argv(case, bad_input_files)
    code, _, err = run_cli(main, *argv)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert case[-1] in err, (argv, err)


def test_bad_input_in_a_real_process_is_one_line_and_exit_2(bad_input_files):
    main, argv = bad_input_argv(BAD_INPUTS[0], bad_input_files)
    r = run_script("train_text.py", *argv)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.parametrize("driver, sizes", [
    ("train_text.py", ["--preset", "gpu", "--batch_size", "4096"]),  # about 1,000 GiB
    ("train_image.py", ["--n_layer", "48", "--n_embd", "1024", "--n_head", "16", "--batch_size", "65536"])])
def test_a_step_that_cannot_fit_is_refused_in_one_line_before_anything_large_is_allocated(tmp_path, driver, sizes):
    proc = subprocess.Popen([sys.executable, driver, *sizes, "--device", "cpu", "--out_dir", str(tmp_path / "o")],
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # its own peak resident set, in kB
    assert os.waitstatus_to_exitcode(status) == 2 and err.count("\n") == 1 and "cannot fit" in err, err
    assert usage.ru_maxrss < 2 * 2**20  # refused before the model (several GiB at these sizes) or a batch was made


# -----------------------------------------------------------------------------
# Images: the denoising EBT, the DiT and the one-pass regressor

def image_config(**kw):
    return ebt.ModelConfig(**{**dict(model="image_ebt", channels=3, image_size=16, patch_size=4, n_layer=2, n_head=2,
                                     n_embd=64, step_size=1000.0, step_size_lr_mult=3000.0, think_steps=1,
                                     landscapes=1), **kw})


def photo_data(crop=16):
    return images.load_data({"dataset": "grace_hopper", "data": None, "image_size": crop})


def held_out_crops(n=64, t=99):
    """(noisy at DDPM step t, clean) validation crops, both in [-1, 1]."""
    clean, noise = photo_data().batch("val", n, generator=torch.Generator().manual_seed(5))
    return image_models.ddpm_noise(clean, t, noise), clean


def test_image_ebt_evaluation_reports_psnr_at_the_trained_steps(tmp_path):
    model = ebt.build_model(image_config(think_steps=2), seed=0)
    with torch.no_grad():  # untrained, the zero-initialised head would leave every step at its input
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    tc = ebt.TrainConfig(batch_size=4, eval_batches=1, eval_steps=5, out_dir=str(tmp_path), device="cpu", seed=0)
    m = ebt.evaluate(model, photo_data(), tc, "cpu")
    assert len(m["psnr_per_step"]) == 5 and len(set(m["psnr_per_step"])) == 5
    assert m["psnr"] == m["psnr_per_step"][1] and m["loss"] == m["loss_per_step"][1]


@pytest.fixture(scope="module")
def trained_image_models(tmp_path_factory):
    """Short trainings on 16x16 crops of matplotlib's photo: EBT (S1), DiT, regressor."""
    models = {}
    for kind in ("image_ebt", "image_dit", "image_regressor"):
        model = ebt.build_model(image_config(model=kind), seed=0)
        tc = ebt.TrainConfig(max_steps=150, batch_size=16, lr=2e-3, warmup_steps=20, eval_interval=150,
                             eval_batches=1, log_interval=50, out_dir=str(tmp_path_factory.mktemp(kind)),
                             device="cpu", seed=0)
        ebt.train(model, photo_data(), tc, Silent())
        models[kind] = model.eval()
    return models


def test_ddpm_noise_against_a_hand_computation():
    betas = [1e-4 + (0.02 - 1e-4) * s / 999 for s in range(1000)]  # beta_1 .. beta_1000
    signal = math.prod(1 - b for b in betas[:99])
    assert image_models.signal_variance(99).item() == pytest.approx(signal, rel=1e-12)
    assert math.sqrt(signal) == pytest.approx(0.95, abs=3e-3) and math.sqrt(1 - signal) == pytest.approx(0.32, abs=0.01)
    clean, noise = torch.full((2, 1, 2, 2), 0.5), torch.full((2, 1, 2, 2), -1.0)
    expected = math.sqrt(signal) * 0.5 - math.sqrt(1 - signal)
    torch.testing.assert_close(image_models.ddpm_noise(clean, 99, noise), torch.full_like(clean, expected))
    per_image = image_models.ddpm_noise(clean, torch.tensor([0, 99]), noise)  # one step per image; t = 0 is clean
    assert torch.equal(per_image[0], clean[0]) and torch.allclose(per_image[1], torch.full_like(clean[1], expected))


def test_ddim_from_step_0_is_the_identity():
    model = ebt.build_model(image_config(model="image_dit"), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # a model that predicts anything: from t = 0 nothing may change
    x = torch.randn(2, 3, 16, 16)
    for passes in (1, 3):
        torch.testing.assert_close(model.denoise(x, 0, passes), x)


def test_ddim_with_the_true_noise_walks_the_forward_process_back_to_the_clean_image(monkeypatch):
    """Deterministic DDIM: given the noise that made x_t, every pass lands on the forward process's own
    x_s = sqrt(abar_s) x_0 + sqrt(1 - abar_s) noise at its next step s, and the last on x_0."""
    model = ebt.build_model(image_config(model="image_dit"), seed=0)
    g = torch.Generator().manual_seed(3)
    clean, noise = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    seen = []
    monkeypatch.setattr(model, "predicted_noise", lambda x, t: seen.append((x, t[0].item())) or noise)
    for passes in (1, 3, 10):
        seen.clear()
        out = model.denoise(image_models.ddpm_noise(clean, 99, noise), 99, passes)
        torch.testing.assert_close(out, clean, rtol=1e-5, atol=1e-5)
        assert len(seen) == passes and seen[0][1] == 99
        for x, t in seen:
            torch.testing.assert_close(x, image_models.ddpm_noise(clean, t, noise), rtol=1e-5, atol=1e-5)


def test_untrained_adaln_zero_ebt_returns_its_input():
    model = ebt.build_model(image_config(), seed=0).eval()
    noisy, _ = held_out_crops(4)
    traj = model.think(model.energy, noisy, 3)
    assert all(torch.equal(y, noisy) for y in traj.ys) and all((e == 0).all() for e in traj.energies)


def test_each_image_model_trains_and_beats_the_noisy_input(trained_image_models):
    noisy, clean = held_out_crops()
    before = image_models.psnr(noisy, clean).mean().item()
    ebt_model = trained_image_models["image_ebt"]
    denoised = {"image_ebt": ebt_model.think(ebt_model.energy, noisy).ys[-1],
                "image_dit": trained_image_models["image_dit"].denoise(noisy, 99, 3),
                "image_regressor": trained_image_models["image_regressor"].denoise(noisy)}
    for kind, y in denoised.items():
        after = image_models.psnr(y, clean).mean().item()
        assert after > before + 4.0, (kind, before, after)  # measured +6.4 (DiT) to +8.6 dB (EBT)


def test_image_ebt_each_step_lowers_the_energy_it_descends(trained_image_models):
    noisy, _ = held_out_crops()
    model = trained_image_models["image_ebt"]
    ys = model.think(model.energy, noisy, 3).ys
    with torch.no_grad():
        for k in range(len(ys) - 1):  # like with like: both on step k's landscape
            landscape = min(k, model.config.landscapes - 1)
            assert model.energy(ys[k + 1], landscape).mean() < model.energy(ys[k], landscape).mean(), k


def test_patchify_roundtrip():
    img = torch.randn(2, 3, 16, 16)
    patches = image_models.patchify(img, 4)
    assert patches.shape == (2, 16, 48)
    assert torch.equal(patches[0, 1], img[0, :, 0:4, 4:8].reshape(-1))  # row-major, second patch
    assert torch.equal(image_models.unpatchify(patches, 4, 3), img)


def test_psnr_hand_checked():
    clean = torch.zeros(2, 1, 4, 4)
    pred = torch.stack([torch.full((1, 4, 4), 0.2), torch.full((1, 4, 4), 1.0)])
    # images in [-1, 1], peak-to-peak 2: mse 0.04 -> 10 log10(4 / 0.04) = 20 dB; mse 1 -> 6.0206 dB
    assert torch.allclose(image_models.psnr(pred, clean), torch.tensor([20.0, 6.0206]), atol=1e-4)
    # predictions are clipped to [-1, 1] first: -1.1 counts as -1
    assert image_models.psnr(torch.full((1, 1, 4, 4), -1.1), torch.full((1, 1, 4, 4), -1.0)).item() == pytest.approx(106.02, abs=0.01)


def write_idx_gz(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_parser_and_cache(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 256, (2, 28, 28))
    (tmp_path / "mnist").mkdir()
    write_idx_gz(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", train)
    write_idx_gz(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz", test)
    assert np.array_equal(images.read_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz"), train)
    monkeypatch.setattr(images, "CACHE_DIR", tmp_path)  # cached files: no network
    got_train, got_test = images.download_dataset("mnist")
    assert got_train.shape == (5, 1, 28, 28) and got_train.dtype == torch.uint8
    assert np.array_equal(got_test[:, 0].numpy(), test)
    for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):  # a download cut short, cached
        (tmp_path / "mnist" / f).write_bytes(gzip.compress(b"\0\0\x08\x03")[:-6])
    code, _, err = run_cli(train_image.main, "--dataset", "mnist", "--max_steps", "1", "--out_dir", str(tmp_path / "o"))
    assert code == 2 and "corrupt or truncated" in err and err.count("\n") == 1, err


def test_cifar10_tarball_parser(tmp_path):
    rng = np.random.default_rng(0)
    batches = {"data_batch_1": rng.integers(0, 256, (3, 3072)), "data_batch_2": rng.integers(0, 256, (2, 3072)),
               "test_batch": rng.integers(0, 256, (4, 3072))}
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in batches.items():
            blob = pickle.dumps({b"batch_label": name.encode(), b"labels": [0] * len(data),
                                 b"data": data.astype(np.uint8), b"filenames": []})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    train, test = images.read_cifar10(path)
    assert train.shape == (5, 3, 32, 32) and test.shape == (4, 3, 32, 32)
    # channel-major rows: the first 1024 values are the red plane
    assert np.array_equal(train[0, 0].reshape(-1), batches["data_batch_1"][0, :1024])
    assert np.array_equal(train[3], batches["data_batch_2"][0].reshape(3, 32, 32))


def test_train_image_driver_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for model in ("ebt", "dit", "regressor"):
        train_image.main(["--model", model, *TINY_IMAGE])
    train_image.main(["--model", "ebt", "--recipe", "s2", "--out_dir", "out-image-ebt-s2", *TINY_IMAGE])
    assert rundir.load_checkpoint("out-image-ebt-s2/ckpt.pt")["model_config"]["random_steps"] == 1
    dirs = ["out-image-ebt", "out-image-ebt-s2", "out-image-dit", "out-image-regressor"]
    train_image.main(["--compare", *dirs, "--report_steps", "3", "--passes", "1", "3", "--device", "cpu"])
    table = (tmp_path / "out-image-compare" / "psnr.md").read_text()
    for row in ("| noisy input | 0 |", "| out-image-regressor | 1 |", "| out-image-dit | 3 |", "| out-image-ebt | 3 |",
                "| out-image-ebt-s2 | 3 |", "t = 99 (trained)", "t = 299 (unseen)"):
        assert row in table, row
    for f in ("grid.png", "energy.png", "psnr.png"):
        assert (tmp_path / "out-image-compare" / f).stat().st_size > 0
    # resume keeps the run's own settings; a training flag given overrides, a model flag must agree
    train_image.main(["--resume", "--max_steps", "6", "--device", "cpu", "--report_steps", "1", "--passes", "1"])
    ckpt = rundir.load_checkpoint("out-image-ebt/ckpt.pt")
    assert ckpt["step"] == 6 and ckpt["train_config"]["batch_size"] == 4 and ckpt["train_config"]["eval_interval"] == 4
    with pytest.raises(ebt.UsageError, match="--n_embd 64 conflicts"):
        train_image.main(["--resume", "--n_embd", "64", "--device", "cpu"])
    with pytest.raises(ebt.UsageError, match="--recipe s2 conflicts"):
        train_image.main(["--resume", "--recipe", "s2", "--device", "cpu"])
    # report levels past the DDPM chain are left out; a DiT shown at its fewest passes when all are above 10
    train_image.main(["--model", "regressor", "--noise_t", "400", "--out_dir", "late", *TINY_IMAGE])
    assert "t = 801 (unseen)" in (tmp_path / "late" / "psnr.md").read_text()
    train_image.main(["--compare", "out-image-dit", "--passes", "12", "--device", "cpu"])
    import shutil
    shutil.copytree("out-image-ebt", "copy/out-image-ebt")
    with pytest.raises(ebt.UsageError, match="named out-image-ebt"):
        train_image.main(["--compare", "out-image-ebt", "copy/out-image-ebt", "--device", "cpu"])


def no_network(monkeypatch):
    import socket
    def refuse(*a, **k):
        raise OSError("no network in this test")
    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_the_image_report_says_its_noise_passes_and_checkpoint(tmp_path, monkeypatch):
    figures = collect_figures(monkeypatch)
    train_image.main([*TINY_IMAGE, "--out_dir", str(tmp_path / "run")])
    grid, psnr, energy = figures[-3:]  # after loss.png's
    assert "t = 99 (trained noise)" in grid._suptitle.get_text()
    assert [ax.get_title() for ax in grid.axes[:3]] == ["noisy input", "run\n1 pass", "clean"]
    psnr.canvas.draw()
    assert [t.get_text() for t in psnr.axes[0].get_xticklabels()] == ["1", "2", "3"]  # numbers, not powers of ten
    assert {f._supxlabel.get_text() for f in (grid, psnr, energy)} == {f"{tmp_path / 'run' / 'ckpt.pt'}, step 4"}


def test_image_photos_split_is_disjoint_and_ships_in_the_wheels(monkeypatch):
    pytest.importorskip("skimage")
    no_network(monkeypatch)  # a photograph scikit-image fetches on first use would fail here
    train, test = images.PHOTOS["train"], images.PHOTOS["test"]
    assert len(train) >= 3 and len(test) >= 2 and not set(train) & set(test)
    data = images.load_data({"dataset": "photos", "data": None, "photos": images.PHOTOS, "image_size": 32})
    assert len(data.split["train"]) == len(train) and len(data.split["val"]) == len(test)
    for img in (*data.split["train"], *data.split["val"]):  # colour photographs, whole, in [0, 1]
        assert img.shape[0] == 3 and min(img.shape[1:]) >= 300 and 0 <= img.min() < img.max() <= 1
    # no test photograph is (a crop of the same size as) a training one
    assert not any(a.shape == b.shape and torch.equal(a, b) for a in data.split["val"] for b in data.split["train"])
    g = torch.Generator().manual_seed(0)
    crops = data.batch("val", 64, g)[0]
    assert crops.shape == (64, 3, 32, 32) and -1 <= crops.min() < crops.max() <= 1


def test_photos_without_scikit_image_is_one_line_and_exit_2(tmp_path, monkeypatch):
    for name in ("skimage", "skimage.data"):
        monkeypatch.setitem(sys.modules, name, None)  # import skimage raises ImportError, installed or not
    code, _, err = run_cli(train_image.main, "--max_steps", "1", "--device", "cpu", "--out_dir", str(tmp_path / "o"))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "pip install scikit-image" in err and "--dataset grace_hopper" in err
    assert not (tmp_path / "o" / "ckpt.pt").exists()  # refused before training
    train_image.main(["--out_dir", str(tmp_path / "gh"), *TINY_IMAGE, "--max_steps", "1"])  # the other photo needs none
    assert "tested on those bottom fifths" in (tmp_path / "gh" / "psnr.md").read_text()


def test_train_image_on_photos_reports_the_photographs_it_never_saw(tmp_path, monkeypatch):
    pytest.importorskip("skimage")
    monkeypatch.chdir(tmp_path)
    flags = [a for a in TINY_IMAGE if a not in ("--dataset", "grace_hopper")]  # the default data: photos
    train_image.main(["--model", "regressor", "--max_steps", "1", *flags])
    said = ("Data: trained on the photographs astronaut, grace_hopper, motorcycle_left, rocket; tested on others, "
            "never seen in training: chelsea, coffee.")
    assert said in (tmp_path / "out-image-regressor" / "psnr.md").read_text()
    ckpt = rundir.load_checkpoint("out-image-regressor/ckpt.pt")
    assert ckpt["started"]["photos"] == images.PHOTOS  # the split as trained: a later PHOTOS cannot change it
    # a run from before the split recorded "photos" for matplotlib's one photo: it is read as grace_hopper
    old = {**ckpt, "started": {"recipe": None, "dataset": "photos", "data": None}}
    Path("old").mkdir()
    torch.save(old, "old/ckpt.pt")
    train_image.main(["--compare", "old", "--out_dir", "report", "--passes", "1", "--device", "cpu"])
    assert "Data: trained on grace_hopper without the bottom fifth" in Path("report/psnr.md").read_text()
    with pytest.raises(ebt.UsageError, match="trained on other data"):
        train_image.main(["--compare", "old", "out-image-regressor", "--passes", "1", "--device", "cpu"])


# -----------------------------------------------------------------------------
# Data parallel (torchrun, gloo on CPU)

def test_a_malformed_dist_timeout_is_one_line(monkeypatch):
    for value in ("five", "-1", "nan", "1e30"):
        monkeypatch.setenv("NANOEBT_DIST_TIMEOUT", value)
        with pytest.raises(ebt.UsageError, match=f"NANOEBT_DIST_TIMEOUT='{value}'"):
            rundir.dist_timeout()
    monkeypatch.setenv("NANOEBT_DIST_TIMEOUT", "2.5")
    assert rundir.dist_timeout() == 2.5


def test_resuming_with_another_number_of_processes_says_the_global_batch_changes(tmp_path, text_file):
    out = tmp_path / "o"
    assert run_cli(train_text.main, *TINY, "--data", str(text_file), "--out_dir", str(out))[0] == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["world"] == 1
    torch.save({**ckpt, "world": 2}, out / "ckpt.pt")  # as a two-process run leaves it
    code, stdout, err = run_cli(train_text.main, "--resume", "--out_dir", str(out), "--max_steps", "6", "--device", "cpu")
    assert code == 0 and "notice: 1 process resume a run of 2: the global batch changes from 8 to 4" in stdout, err


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
import cli, ebt, rundir, test_ebt as T, train_text
torch.set_num_threads(1)
rundir.join_process_group("cpu")
batch_size, out, recipe, max_steps = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
tok, data = T.words_data()
s2 = {{**ebt.RECIPES["s2"], "step_size_lr_mult": 15.0, "replay_size": 8}}
model = ebt.build_model(T.config(vocab_size=tok.vocab_size, init_std=0.0, **(s2 if recipe == "s2" else {{}})), seed=0)
tc = ebt.TrainConfig(max_steps=max_steps, batch_size=batch_size, grad_accum=2, lr=3e-3, warmup_steps=1,
                     eval_interval=4, eval_batches=2, log_interval=1, out_dir=out, device="cpu", seed=0)
records = ebt.train(model, data, tc, rundir.Run(out, resume=max_steps > 4, say=T.quiet))
rank = int(__import__("os").environ.get("RANK", 0))
torch.save({{"state": model.state_dict(), "records": records}}, f"{{out}}/rank{{rank}}.pt")
rundir.leave_process_group()
"""


def torchrun(script, *args):
    return run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *map(str, args))


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process_with_the_global_batch(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(here=str(HERE)))
    r = torchrun(script, 4, tmp_path / "ddp", "s1", 4)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script(str(script), "8", str(tmp_path / "single"), "s1", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1, single = (torch.load(tmp_path / d / f"rank{i}.pt") for d, i in (("ddp", 0), ("ddp", 1), ("single", 0)))
    for name in rank0["state"]:
        assert torch.equal(rank0["state"][name], rank1["state"][name]), f"ranks differ in {name}"
    # Same data (each rank takes half of the same global batch) and a noise-free start, so the runs are the
    # same computation up to float32 summation order (all-reduce vs one batch mean): losses agree to ~1e-6
    # relative; 1e-4 leaves room, while a rank that trained on other data or skipped the all-reduce would
    # be off by ~1e-2.
    losses = lambda run: [(r["step"], r["loss"]) for r in run["records"] if r["kind"] == "train"]
    assert [s for s, _ in losses(rank0)] == [s for s, _ in losses(single)] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(losses(rank0), losses(single)):
        assert a == pytest.approx(b, rel=1e-4)
    for name in single["state"]:
        torch.testing.assert_close(rank0["state"][name], single["state"][name], rtol=1e-3, atol=1e-4, msg=name)


GRADIENT_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
import cli, compiled, ebt, rundir, test_ebt as T
torch.distributed.init_process_group("gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
model = T.tiny(weights=0.3, step_size=0.5, langevin_std=0.3, random_step_size=2.0).train()
g = torch.Generator().manual_seed(6)
x, y = torch.randint(13, (4, 16), generator=g), torch.randint(13, (4, 16), generator=g)
mine = slice(2 * rank, 2 * rank + 2)
torch.manual_seed(4)
model.learn(x[mine], y[mine], 1.0, steps=2, generator=torch.Generator().manual_seed(1))
rundir.Run(sys.argv[1]).average_gradients(model)
torch.save({{n: p.grad for n, p in model.named_parameters()}}, sys.argv[1] + f"/rank{{rank}}.pt")
rundir.leave_process_group()
"""


COMPILED_GRADIENT_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
import cli, compiled, ebt, rundir, test_ebt as T
torch.distributed.init_process_group("gloo")
rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
model = compiled.compile_model(T.tiny(weights=0.3, n_layer=1, step_size=0.5).train())
g = torch.Generator().manual_seed(6)
x, y = torch.randint(13, (6, 16), generator=g), torch.randint(13, (6, 16), generator=g)
mine = slice(3 * rank, 3 * rank + 3)
model.learn(x[mine], y[mine], 1.0, steps=2, generator=torch.Generator().manual_seed(1))
rundir.Run(sys.argv[1]).average_gradients(model)
torch.save({{n: p.grad for n, p in model.named_parameters()}}, sys.argv[1] + f"/rank{{rank}}.pt")
rundir.leave_process_group()
"""


@pytest.mark.slow
def test_compiled_training_under_torchrun_averages_to_one_process(tmp_path):
    """Two ranks, each compiling its training step on half a batch, then the one flattened all-reduce:
    the gradient of the whole batch by one eager backward in one process (float64)."""
    script = tmp_path / "compiled_grads.py"
    script.write_text(COMPILED_GRADIENT_SCRIPT.format(here=str(HERE)))
    r = torchrun(script, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    model = tiny(weights=0.3, n_layer=1, step_size=0.5).train()
    g = torch.Generator().manual_seed(6)
    x, y = torch.randint(13, (6, 16), generator=g), torch.randint(13, (6, 16), generator=g)
    sum(model(x[half], y[half], steps=2, generator=torch.Generator().manual_seed(1))[0] / 2
        for half in (slice(0, 3), slice(3, 6))).backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[n], p.grad, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.slow
def test_torchrun_average_of_stepwise_backward_equals_one_process_single_backward(tmp_path):
    """Two ranks, each half of a batch, each backpropagating one thinking step at a time, then one
    all-reduce: the gradient of the whole batch in one process by one backward (float64). The noise is
    the same per rank here (seeded alike), so the single process draws it per half."""
    script = tmp_path / "grads.py"
    script.write_text(GRADIENT_SCRIPT.format(here=str(HERE)))
    r = torchrun(script, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    model = tiny(weights=0.3, step_size=0.5, langevin_std=0.3, random_step_size=2.0).train()
    g = torch.Generator().manual_seed(6)
    x, y = torch.randint(13, (4, 16), generator=g), torch.randint(13, (4, 16), generator=g)
    total = 0
    for half in (slice(0, 2), slice(2, 4)):
        torch.manual_seed(4)
        total = total + model(x[half], y[half], steps=2, generator=torch.Generator().manual_seed(1))[0] / 2
    total.backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[n], p.grad, rtol=1e-10, atol=1e-13, msg=n)


NAN_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
import cli, compiled, ebt, rundir, test_ebt as T
torch.distributed.init_process_group("gloo")
rank = torch.distributed.get_rank()
tok, data = T.words_data()
model = ebt.build_model(T.config(vocab_size=tok.vocab_size, model="transformer"), seed=0)
model = T.NaNAfter(model, 2 if rank == 1 else 10**9)  # only rank 1 goes bad
tc = ebt.TrainConfig(max_steps=50, batch_size=2, eval_interval=100, log_interval=1, out_dir=sys.argv[1], device="cpu")
try:
    ebt.train(model, data, tc, rundir.Run(tc.out_dir, say=T.quiet))
except ebt.UsageError as e:
    print(f"rank {{rank}} stopped: {{e}}")
rundir.leave_process_group()
"""


@pytest.mark.slow
def test_torchrun_nan_on_one_rank_stops_every_rank(tmp_path):
    script = tmp_path / "nan.py"
    script.write_text(NAN_SCRIPT.format(here=str(HERE)))
    r = torchrun(script, tmp_path / "o")
    assert r.returncode == 0, r.stderr[:3000]
    assert "rank 0 stopped" in r.stdout and "rank 1 stopped" in r.stdout and "NaN or infinite" in r.stdout, (
        r.stdout[-2000:], r.stderr[-2000:])


def spawn_ranks(argv, logs, env=None, world=2):
    """The ranks of a run, started as torchrun starts them: the rendezvous store is held here, on a port the
    system chose and that stays bound (no free port released, then raced for), and each rank writes its own log.
    Returns the processes; the store lives as long as they are referenced (spawn_ranks.stores)."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    spawn_ranks.stores.append(store)
    return [subprocess.Popen([sys.executable, "train_text.py", *argv], cwd=HERE, stdout=open(logs / f"rank{r}.log", "w"),
                             stderr=subprocess.STDOUT, env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT":
                             str(store.port), "TORCHELASTIC_USE_AGENT_STORE": "True", "WORLD_SIZE": str(world),
                             "RANK": str(r), "LOCAL_RANK": str(r), "OMP_NUM_THREADS": "1", **(env or {})})
            for r in range(world)]


spawn_ranks.stores = []


def wait_for_step(procs, metrics, step):
    """Until the run has logged `step`; a run that ends first fails the test, one that hangs raises after 10 minutes."""
    deadline = time.monotonic() + 600
    while not any(r["kind"] == "train" and r["step"] >= step for r in rundir.read_records(metrics)):
        assert all(p.poll() is None for p in procs), "the run ended before the step"
        if time.monotonic() > deadline:
            raise TimeoutError(f"no step {step} in {metrics} after 10 minutes: the run hangs")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_under_data_parallel_stops_every_rank_at_one_step_and_resumes_exactly(tmp_path, text_file):
    """SIGTERM to every rank (what torchrun and schedulers send), at random steps, three times: each rank exits
    130, the checkpoint and the per-rank replay buffers are one set, and the resumed S2 run ends exactly where
    a straight run does."""
    argv = [*TINY, "--recipe", "s2", "--data", str(text_file), "--max_steps", "40", "--eval_interval", "10"]
    (tmp_path / "straight").mkdir()  # its ranks run beside the first stopped ones, their logs apart
    straight = spawn_ranks([*argv, "--out_dir", str(tmp_path / "straight")], tmp_path / "straight")
    out, rng, step = tmp_path / "stopped", random.Random(0), 0
    for attempt in range(3):
        at = rng.randrange(step + 2, step + 12)  # past the last stop: only this launch's records reach it
        procs = spawn_ranks([*argv, "--out_dir", str(out), *(["--resume"] if attempt else [])], tmp_path)
        wait_for_step(procs, out / "metrics.jsonl", at)
        for p in procs:
            p.terminate()
        assert [p.wait(timeout=60) for p in procs] == [130, 130], (tmp_path / "rank0.log").read_text()[-2000:]
        step = rundir.load_checkpoint(out / "ckpt.pt")["step"]
        assert step >= at and [f.name for f in out.glob("replay-rank1-*")] == [f"replay-rank1-step{step}.pt"]
    procs = spawn_ranks([*argv, "--out_dir", str(out), "--resume"], tmp_path)
    assert [p.wait(timeout=300) for p in procs + straight] == [0, 0, 0, 0], (tmp_path / "rank0.log").read_text()[-2000:]
    a, b = (rundir.load_checkpoint(d / "ckpt.pt") for d in (tmp_path / "straight", out))
    assert a["step"] == b["step"] == 40
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    ranks = [torch.load(d / "replay-rank1-step40.pt") for d in (tmp_path / "straight", out)]
    for k in a["replay"]:  # every rank's replay buffer as a straight run's, and each its own sequences
        assert torch.equal(a["replay"][k], b["replay"][k]) and torch.equal(ranks[0][k], ranks[1][k])
    assert not torch.equal(a["replay"]["idx"], ranks[0]["idx"])


@pytest.mark.slow
def test_a_stalled_rank_is_named_within_the_stated_time(tmp_path, text_file):
    procs = spawn_ranks([*TINY, "--data", str(text_file), "--max_steps", "100000", "--out_dir", str(tmp_path / "o")],
                        tmp_path, env={"NANOEBT_DIST_TIMEOUT": "2"})
    wait_for_step(procs, tmp_path / "o" / "metrics.jsonl", 3)
    procs[1].send_signal(signal.SIGSTOP)
    try:  # rank 0 gives up and names rank 1 (torchrun would end it)
        assert procs[0].wait(timeout=120) == 2
    finally:
        procs[1].kill()
    err = (tmp_path / "rank0.log").read_text().splitlines()[-1]
    assert err.startswith("error: rank 1 stopped answering: no reply within 2 s"), err
