"""
Figures of thinking: an EBT's descent on a text or a generation, and perplexity against more thinking;
imported by sample.py, results.py, train_image.py and the notebook. A plot_ function returns a Figure that
Jupyter shows by itself (and the numbers it measured); a draw_ function draws on one axis of a larger one.
"""
import itertools
from pathlib import Path

import torch

import ebt
import measure
import rundir


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


def sign(fig, *checkpoints):
    """Name under the figure the checkpoints it shows, each with its step (mapped: the weights are not read)."""
    steps = [torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("step", "?") for path in checkpoints]
    fig.supxlabel("; ".join(f"{path}, step {step}" for path, step in zip(checkpoints, steps)), fontsize=8, color="dimgray")
    return fig


def grid_at(ax, ticks):
    """A light grid, and x ticks at exactly these values written as numbers (a log axis writes powers of ten)."""
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.grid(alpha=0.3)


# Thinking on one text, or on what generate() returned --------------------------

def plot_energy_trajectories(model, energies, title, position_label):
    """Energy (T, K+1) against thinking step, one faint line per token coloured by its position, and their mean."""
    from matplotlib import cm, colors
    fig = figure(figsize=(6.6, 3.4), layout="constrained")
    ax = fig.subplots()
    by_position = cm.ScalarMappable(colors.Normalize(0, max(1, len(energies) - 1)), "viridis")
    for i, e in enumerate(energies):
        ax.plot(e.numpy(), color=by_position.to_rgba(i), alpha=0.35, lw=1)
    ax.plot(energies.nanmean(0).numpy(), color="black", lw=2, label="mean over tokens")
    fig.colorbar(by_position, ax=ax, label=position_label)
    L = model.config.landscapes  # which landscape each energy is on: step k's candidate is scored on step k's
    landscapes = "one landscape" if L == 1 else f"each on its own landscape; steps >= {L - 1} share the last"
    ax.set(xlabel=f"thinking step ({landscapes})", ylabel="energy", title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def plot_energy_per_step(model, tokenizer, text, steps=None, seed=0):
    """Energy against thinking step, one line per token of the text. Returns (Figure, energies (T, K+1))."""
    traj = measure.think_on_text(model, tokenizer, text, steps, seed).traj
    energies = torch.stack(traj.energies)[:, 0].T.float().cpu()  # (T, K+1)
    title = f"energy while thinking, {len(energies)} tokens"
    return plot_energy_trajectories(model, energies, title, "position in the text"), energies


def plot_generation(model, generation):
    """The energy trajectories of the tokens generate() returned (its batch's first row); a token that stopped
    early (adaptive stopping) ends early. Returns (Figure, energies (n, K+1), NaN after a stop)."""
    rundir.require_ebt(model, "plotting a generation's energies")
    if not generation.trajectory:
        raise ebt.UsageError("the generation has no thinking trajectories (no new tokens, or not an EBT)")
    rows = [t[0].float().cpu() for t in generation.trajectory]  # each token's, in the batch's first row
    energies = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=float("nan"))
    title = f"energy while generating, {len(energies)} tokens"
    return plot_energy_trajectories(model, energies, title, "generated token number"), energies


def which_prediction(tokenizer, thought, p):
    """The prediction a figure shows, as a reader finds it: the text it follows and its place."""
    return f"after {tokenizer.decode(thought.ids[max(0, p - 11):p + 1].tolist())!r} (token {p + 1} of {len(thought.labels)})"


def plot_energy_landscape(model, tokenizer, text, position=-1, steps=None, seed=0, grid=31):
    """The energy around one token's prediction on the plane through the start, middle and
    end of its descent path, with the path drawn (points off the plane are projected).
    Energies are on the landscape of the path's last step. Returns (Figure, energies (grid, grid))."""
    thought = measure.think_on_text(model, tokenizer, text, steps, seed)
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
    p = position % len(thought.labels)
    K, landscape = len(path) - 1, min(len(path) - 2, model.config.landscapes - 1)
    context = [(k[..., :p + 1, :], w[..., :p + 1, :]) for k, w in thought.context]  # what position p sees
    with torch.no_grad():
        energies = torch.cat([
            model.energy(chunk[:, None].softmax(-1), [(k.expand(len(chunk), -1, -1, -1), w.expand(len(chunk), -1, -1, -1))
                                          for k, w in context], landscape)[:, 0]
            for chunk in points.split(64)]).reshape(grid, grid).float().cpu()
    fig = figure(figsize=(5, 4), layout="constrained")
    ax = fig.subplots()
    filled = ax.contourf(a.numpy(), b.numpy(), energies.numpy(), levels=20, cmap="viridis")
    fig.colorbar(filled, ax=ax, label="energy")
    ax.plot(path_xy[:, 0].numpy(), path_xy[:, 1].numpy(), "w.-", lw=1.5, ms=8, label=f"descent: start, then {K} steps")
    ax.plot(*path_xy[0].numpy(), "wo", ms=9, mfc="none", label="start (random logits)")
    ax.plot(*path_xy[-1].numpy(), "r*", ms=12, label=f"after step {K}")
    ax.set(xlabel="direction start -> end", ylabel="direction to the middle",
           title=f"predicting {thought.labels[p]!r} {which_prediction(tokenizer, thought, p)}\non the landscape of "
                 f"step {landscape + 1}" + (f" (which steps {landscape + 1} to {K} share)" if K > landscape + 1 else ""))
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8, loc="best")
    return fig, energies


def plot_distribution_sharpening(model, tokenizer, text, position=-1, steps=None, seed=0, top=4):
    """The predicted distribution at one position after each thinking step: the tokens that
    are in the top `top` at any step. Returns (Figure, probabilities (K+1, V))."""
    thought = measure.think_on_text(model, tokenizer, text, steps, seed)
    probs = torch.stack([y[0, position] for y in thought.traj.ys]).float().softmax(-1).cpu()  # (K+1, V)
    shown = list(dict.fromkeys(probs.topk(min(top, probs.shape[-1]), -1).indices.flatten().tolist()))
    shown.sort(key=lambda i: -probs[-1, i])
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum(-1)
    target = thought.ids[1:][position].item()
    labels = [measure.token_label(tokenizer, i) + (" (true)" if i == target else "") for i in shown]
    K = len(probs) - 1
    fig = figure(figsize=(max(5, 0.5 * K + 3), 0.3 * len(shown) + 2.6), layout="constrained")
    spread, ax = fig.subplots(2, 1, sharex=True, height_ratios=(1, max(2, 0.4 * len(shown))))
    spread.plot(range(K + 1), entropy.numpy(), marker="o", color="C0")
    spread.set(ylabel="entropy\n(nats)",
               title=f"the prediction {which_prediction(tokenizer, thought, position % len(thought.labels))},\nstep by step")
    spread.grid(alpha=0.3)
    image = ax.imshow(probs[:, shown].T.numpy(), aspect="auto", cmap="Blues", vmin=0, interpolation="nearest")
    if K <= 12:  # the numbers fit in their cells
        for k in range(K + 1):
            for r, i in enumerate(shown):
                ax.text(k, r, f"{probs[k, i]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if probs[k, i] > 0.6 * probs[:, shown].max() else "black")
    ax.set_yticks(range(len(shown)), labels, family="monospace")
    ax.set(xlabel="thinking step")
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.colorbar(image, ax=[spread, ax], label="probability")
    return fig, probs


# Thinking measured on windows: {source name: measure.thinking_curves(...)} -----

def plot_thinking_curves(curves, trained_steps):
    """Perplexity against steps and candidates, a row per source, each its own scale (their perplexities lie apart)."""
    fig = figure(figsize=(8, 0.4 + 2.6 * len(curves)), layout="constrained")
    rows = fig.subplots(len(curves), 2, squeeze=False)
    for i, ((label, r), (by_steps, by_candidates)) in enumerate(zip(curves.items(), rows)):
        by_steps.plot(list(r["steps"]), list(r["steps"].values()), marker="o", color=f"C{i}")
        by_candidates.plot(list(r["candidates"]), list(r["candidates"].values()), marker="o", color=f"C{i}")
        by_steps.axvline(trained_steps, color="gray", ls=":", label="trained steps")
        by_steps.set(ylabel=f"perplexity, {label}")
        by_steps.xaxis.get_major_locator().set_params(integer=True)
        by_steps.grid(alpha=0.3)
        by_candidates.set(xscale="log")
        grid_at(by_candidates, list(r["candidates"]))
    by_steps.set(xlabel="thinking steps (1 candidate)")
    by_candidates.set(xlabel=f"candidates N ({trained_steps} steps, lowest energy kept)")
    fig.axes[0].legend(fontsize=8)
    fig.suptitle("perplexity vs thinking")
    return fig


def draw_candidates(ax, diagnostics, title):
    """The candidates at a few positions: final energy against cross-entropy, each less its position's
    mean. An energy that ranks candidates puts every position's points on a rising line."""
    for i, (energy, ce) in enumerate(zip(diagnostics["examples"]["energy"], diagnostics["examples"]["CE"])):
        energy, ce = torch.tensor(energy), torch.tensor(ce)
        ax.scatter(energy - energy.mean(), ce - ce.mean(), s=12, label=f"position {i + 1}")
    ax.set(xlabel="final energy, less the position's mean", ylabel="cross-entropy, less the position's mean",
           title=f"{title}: Spearman {diagnostics['correlation']:+.2f} (all positions)")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)


def draw_best_of(ax, diagnostics, label, color):
    """The best of n candidates picked by energy (solid) and by the cross-entropy itself (dotted: a perfect
    verifier), as a perplexity change against a candidate picked at random (0: no better than chance)."""
    best, n = diagnostics["best of"], list(diagnostics["best of"]["random"])
    for pick, style in (("energy", "-"), ("oracle", ":")):
        change = [measure.ppl_change(best["random"][k], best[pick][k]) for k in n]
        ax.plot(n, change, style, color=color, marker="o", ms=3, label=f"{label}: by {pick}")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xlabel="candidates n", xscale="log", ylabel="perplexity change vs a random pick (%)")
    grid_at(ax, n)


def plot_verifier(curves):
    """An EBT's curves: each source's candidates at a few positions; the best of n by energy, at random, by truth."""
    fig = figure(figsize=(4.2 * (len(curves) + 1), 3.8), layout="constrained")
    axes = fig.subplots(1, len(curves) + 1)
    for ax, (name, r) in zip(axes, curves.items()):
        draw_candidates(ax, r["verifier"], name)
    for (name, r), color in zip(curves.items(), ("C0", "C3", "C2", "C4")):
        draw_best_of(axes[-1], r["verifier"], name, color)
    axes[0].legend(fontsize=8)
    axes[-1].legend(fontsize=8)
    fig.suptitle("does the energy rank its candidates?")
    return fig


# Image denoising: train_image.py's report -------------------------------------

def short(name):
    return name.removeprefix("out-").removeprefix("image-")  # the prefixes every run's directory shares


def plot_grid(columns, title):
    """One row per crop, one column per {title: images}: noisy, each model's denoising, clean."""
    rows = len(columns["clean"])
    fig = figure(figsize=(max(1.3 * len(columns), 5), 1.2 * rows + 1.2), layout="constrained")
    axes = fig.subplots(rows, len(columns), squeeze=False)
    for c, (name, images) in enumerate(columns.items()):
        axes[0, c].set_title(name, fontsize=9)
        for r in range(rows):
            img = ((images[r].detach().float() + 1) / 2).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            axes[r, c].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1,
                              interpolation="nearest")
            axes[r, c].axis("off")
    fig.suptitle(title, fontsize=9)
    return fig


def plot_psnr(table, levels, trained_t):
    """PSNR against forward passes, one panel per noise level, one curve per model."""
    fig = figure(figsize=(3.4 * len(levels) + 1.4, 3.3), layout="constrained")
    names = list(dict.fromkeys(name for name, _ in table))
    for ax, t in zip(fig.subplots(1, len(levels), squeeze=False)[0], levels):
        for i, name in enumerate(names):
            points = sorted((p, row[t]) for (n, p), row in table.items() if n == name)
            if name == "noisy input":
                ax.axhline(points[0][1], color="gray", ls=":", label=name)
            elif len(points) == 1:  # one pass
                ax.axhline(points[0][1], color=f"C{i}", ls="--", lw=1)
                ax.plot(*points[0], marker="s", color=f"C{i}", label=short(name))
            else:
                ax.plot(*zip(*points), marker="o", ms=3, color=f"C{i}", label=short(name))
        ax.set(xscale="log", title=f"t = {t} ({'trained' if t == trained_t else 'unseen'})",
               xlabel="forward passes", ylabel="PSNR (dB)")
        passes = max(p for _, p in table)
        grid_at(ax, [n for n in (1, 2, 3, 5, 10, 20, 30, 50, 100, 200, 300, 500, 1000) if n <= passes] or [1])
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right center", fontsize=9)
    return fig


def plot_energy(curves, trained_t):
    """Each EBT's mean energy along its thinking steps, at each noise level."""
    fig = figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for t, per_model in curves.items():
        for name, energies in per_model.items():
            label = f"{short(name)}, t = {t}" + (" (trained)" if t == trained_t else "")
            ax.plot(range(len(energies)), energies, marker="o", label=label)
    ax.set(xlabel="thinking step (0 = the noisy input; each on its step's landscape)", ylabel="mean energy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


# Training ----------------------------------------------------------------------

def plot_metrics(records, path):
    """Loss curve PNG from the metrics log, none before its first record: the training loss (smoothed from 10
    points on, raw faint), and the validation loss (an EBT's after 1, the trained and the most evaluated steps)."""
    train, val = ([r for r in records if r["kind"] == kind] for kind in ("train", "eval"))
    if not train and not val:
        return
    fig = figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    if train:  # a few points are drawn raw: a smoothed line would only lag them
        steps, losses, smooth = [r["step"] for r in train], [r["loss"] for r in train], len(train) >= 10
        ax.plot(steps, losses, color="C0", **(dict(alpha=0.25, lw=0.8) if smooth else dict(marker="o", label="train loss")))
        if smooth:
            ax.plot(steps, list(itertools.accumulate(losses, lambda avg, loss: 0.9 * avg + 0.1 * loss)), color="C0",
                    label="train loss (smoothed; raw faint)")
    K = len(val[0].get("loss_per_step", [])) if val else 0
    trained = val[0].get("trained_steps", val[0]["loss_per_step"].index(val[0]["loss"]) + 1) - 1 if K else None
    for k in sorted({0, trained, K - 1}) if K else []:
        ax.plot([r["step"] for r in val], [r["loss_per_step"][k] for r in val], marker="o",
                label=f"val loss, {k + 1} thinking step{'s' if k else ''}{' (as trained)' if k == trained else ''}")
    if val and not K:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], marker="o", label="val loss")
    images = any(r["kind"] == "start" and r.get("model", "").startswith("image_") for r in records)
    ax.set(xlabel="optimizer step", ylabel="loss (smooth L1 on pixels in [-1, 1])" if images else "loss (nats per token)",
           title=f"training: {Path(path).parent.name}, up to step {records[-1]['step']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
