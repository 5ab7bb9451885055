"""
Generate text with a trained text EBT (or the Transformer++ baseline) and watch it think; the
plots of thinking live here too (a notebook imports them: `import sample`).

    python sample.py --out_dir out-text --prompt "ROMEO:" --num_tokens 300
    python sample.py --steps 8 --candidates 4 --top_k 10    # think longer, keep the lowest-energy candidate
    python sample.py --steps 16 --tolerance 1e-3            # adaptive: stop a token once a step hardly lowers its energy
    python sample.py --plots plots/                         # 5 PNGs of the thinking behind the text
    python sample.py --eval --plots plots/                  # perplexity vs steps and candidates, val and OOD
"""
import cli  # first: a Ctrl-C while torch loads exits quietly
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import ebt
from data import prepare
from data.text import CharTokenizer, random_windows, read_text
import rundir
import plots
import compiled

# -----------------------------------------------------------------------------
# Plots of thinking. Each takes a model (eval mode) and a text, or what generate() returned,
# and returns a matplotlib figure (shown by Jupyter by itself) and the numbers behind it.

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
    fig = plots.figure(figsize=(8, 3.4), layout="constrained")
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



@dataclass
class TextThinking:
    """An EBT thinking at every position of a text at once (teacher-forced)."""
    ids: torch.Tensor   # (T + 1,) the text's tokens; position i sees ids[:i+1] and predicts ids[i+1]
    labels: list        # T readable labels of the predicted tokens ids[1:]
    traj: ebt.Trajectory    # ys: K+1 tensors (1, T, V); energies: K+1 tensors (1, T)
    context: list       # per-layer (k, v) of ids[:-1], each (1, H, T, Dh)

    def energies(self):
        return torch.stack(self.traj.energies)[:, 0].T.float().cpu()  # (T, K+1)


def token_label(tokenizer, i):
    return tokenizer.decode([i]).replace("\n", "\\n").replace(" ", "␣")


@torch.no_grad()
def think_on_text(model, tokenizer, text, steps=None, seed=0):
    """Think about every next token of a text (its last block_size + 1 tokens) from fixed random
    starts, for `steps` steps (default longer_steps(): where thinking longer goes)."""
    rundir.require_ebt(model, "plotting the energy")
    ids = torch.tensor(tokenizer.encode(text)[-(model.config.block_size + 1):])
    if len(ids) < 2:
        raise ebt.UsageError(f"the text {text!r} is too short to plot: it needs at least 2 tokens")
    device = next(model.parameters()).device
    context = model.context(ids[None, :-1].to(device))
    traj = model.think_candidates(context, len(ids) - 1, 1, torch.Generator().manual_seed(seed),
                                  steps=steps or ebt.THINK_LONGER * model.trained_steps())
    traj = ebt.Trajectory([y[:, 0] for y in traj.ys], [e[:, 0] for e in traj.energies])
    return TextThinking(ids, [token_label(tokenizer, i) for i in ids[1:].tolist()], traj, context)


def step_axis_label(model):
    """Which landscape each plotted energy is on: step k's candidate is scored on step k's."""
    L = model.config.landscapes
    if L == 1:
        return "thinking step (one landscape)"
    return f"thinking step (each on its own landscape; steps >= {L - 1} share the last)"


def plot_energy_trajectories(model, energies, title, position_label):
    """Energy (T, K+1) against thinking step, one faint line per token coloured by its position, and their mean."""
    from matplotlib import cm, colors
    fig = plots.figure(figsize=(6.6, 3.4), layout="constrained")
    ax = fig.subplots()
    by_position = cm.ScalarMappable(colors.Normalize(0, max(1, len(energies) - 1)), "viridis")
    for i, e in enumerate(energies):
        ax.plot(e.numpy(), color=by_position.to_rgba(i), alpha=0.35, lw=1)
    ax.plot(energies.nanmean(0).numpy(), color="black", lw=2, label="mean over tokens")
    fig.colorbar(by_position, ax=ax, label=position_label)
    ax.set(xlabel=step_axis_label(model), ylabel="energy", title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def plot_energy_per_step(model, tokenizer, text, steps=None, seed=0):
    """Energy against thinking step, one line per token of the text. Returns (Figure, energies (T, K+1))."""
    energies = think_on_text(model, tokenizer, text, steps, seed).energies()
    title = f"energy while thinking, {len(energies)} tokens"
    return plot_energy_trajectories(model, energies, title, "position in the text"), energies


def plot_generation(model, generation, row=0):
    """The energy trajectories of generated tokens: what generate() returned (one row of its
    batch). Positions that stopped early (adaptive stopping) end early. Returns (Figure,
    energies (n, K+1), NaN after a stop)."""
    rundir.require_ebt(model, "plotting a generation's energies")
    if not generation.trajectory:
        raise ebt.UsageError("the generation has no thinking trajectories (no new tokens, or not an EBT)")
    K = max(t.shape[-1] for t in generation.trajectory)
    energies = torch.full((len(generation.trajectory), K), float("nan"))
    for i, t in enumerate(generation.trajectory):
        energies[i, :t.shape[-1]] = t[row].float().cpu()
    title = f"energy while generating, {len(energies)} tokens"
    return plot_energy_trajectories(model, energies, title, "generated token number"), energies


def plot_energy_heatmap(model, tokenizer, text, steps=None, seed=0):
    """Per-token energy over thinking steps, tokens labelled: hard tokens stay high.
    Returns (Figure, energies (T, K+1))."""
    thought = think_on_text(model, tokenizer, text, steps, seed)
    energies = thought.energies()
    per_row, T = 32, len(energies)  # a long text wraps into rows of readable labels
    rows = (T + per_row - 1) // per_row
    fig = plots.figure(figsize=(0.26 * min(T, per_row) + 2.2, 1.9 * rows + 0.5), layout="constrained")
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    for r, ax in enumerate(axes):
        part = slice(r * per_row, min(T, (r + 1) * per_row))
        image = ax.imshow(energies[part].T.numpy(), aspect="auto", cmap="magma", interpolation="nearest",
                          vmin=energies.min().item(), vmax=energies.max().item())
        ax.set_xticks(range(part.stop - part.start), thought.labels[part], fontsize=10, family="monospace")
        ax.set(ylabel="thinking step")
    axes[-1].set(xlabel="predicted token")
    axes[0].set_title("energy per token and step (bright = high = unsure)")
    fig.colorbar(image, ax=list(axes), label="energy")
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
    fig = plots.figure(figsize=(5, 4), layout="constrained")
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
    K = len(probs) - 1
    fig = plots.figure(figsize=(max(5, 0.5 * K + 3), 0.3 * len(shown) + 2.6), layout="constrained")
    spread, ax = fig.subplots(2, 1, sharex=True, height_ratios=(1, max(2, 0.4 * len(shown))))
    spread.plot(range(K + 1), entropy.numpy(), marker="o", color="C0")
    spread.set(ylabel="entropy\n(nats)", title=f"distribution sharpening at position {position % len(thought.labels)}")
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

# -----------------------------------------------------------------------------
# Thinking evaluated on text: perplexity against steps and candidates, and does the energy verify?


@torch.no_grad()
def thinking_curves(model, ids, steps=(1, 2, 4, 8), candidates=(1, 2, 4, 8), windows=16, seed=0, examples=4):
    """Perplexity on fixed windows of a 1-D token tensor after each number of thinking steps (one
    candidate), and with each number N of candidates at the trained steps, keeping the lowest final
    energy. N = 1 is thinking as trained, without noise (the steps curve at the trained count): what
    self-verification is measured against; N > 1: the first N of max(candidates), each with the paper's
    inference noise. Flat for the Transformer++. Repeatable: seed fixes windows, starts and noise.
    An EBT's result also holds "verifier": does the energy rank its candidates (see verifier())?"""
    if len(ids) <= model.config.block_size:
        raise ebt.UsageError(f"{len(ids)} tokens are too few to evaluate on: need more than "
                             f"block_size={model.config.block_size}")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x, y = (t.to(device) for t in random_windows(ids, model.config.block_size, windows, g))
    ppl = lambda logits: math.exp(ebt.cross_entropy(logits.float(), y).item())
    if not isinstance(model, ebt.TextEBT):
        flat = ppl(model.logits(x)[0])
        return {"steps": {k: flat for k in steps}, "candidates": {n: flat for n in candidates}}
    context, trained = model.context(x), model.trained_steps()
    one = model.think_candidates(context, x.shape[1], 1, g, steps=max(*steps, trained))
    by_steps = {k: ppl(one.ys[k][:, 0]) for k in steps}
    single = ppl(one.ys[trained][:, 0])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the noise, seeded
        torch.manual_seed(seed)
        many = model.think_candidates(context, x.shape[1], max(candidates), g)
    final = many.energies[-1]  # (W, N, S)
    by_candidates = {n: single if n == 1 else ppl(ebt.keep_lowest(many.ys[-1][:, :n], final[:, :n]))
                     for n in candidates}
    return {"steps": by_steps, "candidates": by_candidates,
            "verifier": verifier([y_[:, 0] for y_ in one.ys], many.ys[-1], final, y, candidates, examples)}


def verifier(ys, candidates_ys, final_energy, targets, counts, examples=4):
    """Can the energy tell a good candidate from a bad one? From one noiseless descent's states ys
    [(W, S, V)] and the final logits (W, N, S, V) and energies (W, N, S) of N noisy candidates:
    - "correlation": Spearman's, between final energy and cross-entropy across the N candidates of a
      position, averaged over positions (1: the energy ranks them as the truth does; 0: not at all);
      "entropy correlation": the same with each candidate's entropy (1: the energy measures confidence);
    - "best of": the cross-entropy (nats) of the best of the first n candidates picked by "energy"
      (self-verification), at "random", and by the cross-entropy itself ("oracle": a perfect verifier);
    - per thinking step k: "argmax changed", the share of positions whose most likely token step k
      changed, and "CE change", what step k did to the cross-entropy (nats; does a step do anything?);
    - "examples": the candidates' final energies and cross-entropies at a few positions, for a plot."""
    loss = torch.nn.functional.cross_entropy(candidates_ys.float().movedim(-1, 1),  # (W, N, S)
                                             targets[:, None].expand(candidates_ys.shape[:-1]), reduction="none")
    log_p = candidates_ys.float().log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)  # (W, N, S)
    picks = {"energy": final_energy, "random": torch.zeros_like(loss), "oracle": loss}
    step_ce = [ebt.cross_entropy(y_.float(), targets).item() for y_ in ys]
    where = torch.linspace(0, loss.shape[0] * loss.shape[2] - 1, examples).long()
    flat = lambda t: t.movedim(1, -1).flatten(0, 1)[where]  # (examples, N)
    return {"correlation": spearman(final_energy, loss).mean().item(),
            "entropy correlation": spearman(final_energy, entropy).mean().item(),
            "best of": {name: {n: best_of(loss[:, :n], score[:, :n]).mean().item() for n in counts}
                        for name, score in picks.items()},
            "argmax changed": {k: (ys[k].argmax(-1) != ys[k - 1].argmax(-1)).double().mean().item()
                               for k in range(1, len(ys))},
            "CE change": {k: step_ce[k] - step_ce[k - 1] for k in range(1, len(ys))},
            "examples": {"energy": flat(final_energy).tolist(), "CE": flat(loss).tolist()}}


def spearman(x, y):
    """Spearman's correlation of x and y (B, N, P) across the N candidates at each position: (B, P)."""
    def order(t):
        i, j = t[:, :, None], t[:, None]  # [b, i, j, p]: candidate i against candidate j
        return (i < j).sum(1) + ((i == j).sum(1) - 1).double() / 2  # equal values share their mean rank
    rx, ry = (r - r.mean(1, keepdim=True) for r in (order(x), order(y)))
    return ((rx * ry).sum(1) / (rx.square().sum(1) * ry.square().sum(1)).sqrt()).nan_to_num(0.0)  # all equal: 0


def best_of(loss, score):
    """The loss (B, N, P) of the candidate scored lowest at each position, (B, P), ties sharing the pick:
    by final energy it is self-verification, by the loss a perfect verifier, by a constant a random pick."""
    score = score.nan_to_num(nan=math.inf)
    lowest = score == score.min(1, keepdim=True).values
    return (loss * lowest).sum(1) / lowest.sum(1)


def verifier_table(results):
    """results: {source name: thinking_curves(...)} of an EBT -> what its energy knows of its candidates."""
    names, first = list(results), next(iter(results.values()))["verifier"]
    n = max(first["best of"]["energy"])
    row = lambda label, value: f"{label:<34}" + "".join(f"{value(results[name]['verifier']):>14.3f}" for name in names)
    lines = [f"{'self-verification':<34}" + "".join(f"{name[:13]:>14}" for name in names),
             row("Spearman(final energy, CE)", lambda v: v["correlation"]),
             row("Spearman(final energy, entropy)", lambda v: v["entropy correlation"])]
    lines += [row(f"CE, best of {n} {how}", lambda v, pick=pick: v["best of"][pick][n])
              for pick, how in (("energy", "by energy"), ("random", "at random"), ("oracle", "by CE (oracle)"))]
    lines += [row(f"argmax changed at step {k} (share)", lambda v, k=k: v["argmax changed"][k])
              for k in first["argmax changed"]]
    return "\n".join(lines)


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
        change = [100 * (math.exp(best[pick][k] - best["random"][k]) - 1) for k in n]
        ax.plot(n, change, style, color=color, marker="o", ms=3, label=f"{label}: by {pick}")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xlabel="candidates n", xscale="log", ylabel="perplexity change vs a random pick (%)")
    ax.set_xticks(n, [str(k) for k in n])
    ax.minorticks_off()
    ax.grid(alpha=0.3)


def plot_verifier(results, title="does the energy rank its candidates?"):
    """results: {source name: thinking_curves(...)} of an EBT -> a Figure: each source's candidates at a few
    positions, and the best of n picked by energy, at random and by the truth."""
    fig = plots.figure(figsize=(4.2 * (len(results) + 1), 3.8), layout="constrained")
    axes = fig.subplots(1, len(results) + 1)
    for ax, (name, r) in zip(axes, results.items()):
        draw_candidates(ax, r["verifier"], name)
    for (name, r), color in zip(results.items(), ("C0", "C3", "C2", "C4")):
        draw_best_of(axes[-1], r["verifier"], name, color)
    axes[0].legend(fontsize=8)
    axes[-1].legend(fontsize=8)
    fig.suptitle(title)
    return fig


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


def validation_and_ood(tokenizer, corpus, ood_text=None):
    """Token ids to evaluate thinking on: the validation split of the training corpus (data/prepare.py), and an
    out-of-distribution text (default: pydoc_data.topics) cut to the vocabulary.
    Returns (val ids, OOD ids, characters dropped from the OOD text)."""
    ood, dropped = in_vocabulary(pydoc_topics_text() if ood_text is None else ood_text, tokenizer)
    return corpus.val, torch.tensor(tokenizer.encode(ood)), dropped


# -----------------------------------------------------------------------------
# The command line


PLOTS = {"energy_per_step": plot_energy_per_step, "energy_heatmap": plot_energy_heatmap,
         "energy_landscape": plot_energy_landscape, "distribution_sharpening": plot_distribution_sharpening}
# plus generation.png: the energy of every generated token while it was thought about


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    s = p.add_argument
    s("--out_dir", default="out-text", help="directory holding ckpt.pt (default: %(default)s)")
    s("--ckpt", help="checkpoint file (default: OUT_DIR/best.pt, the lowest validation loss, else OUT_DIR/ckpt.pt)")
    s("--prompt", default="\n", help="text to continue (default: a newline)")
    s("--num_tokens", type=int, default=300, help="(default: %(default)s)")
    s("--temperature", type=float, default=1.0, help="0 = most likely token (default: %(default)s)")
    s("--top_k", type=int, help="sample among the k most likely tokens only")
    s("--seed", type=int, default=1337, help="of the sampling (--eval's windows and noise are fixed) (default: %(default)s)")
    cli.add_device_flag(p)
    s("--plots", help="save the thinking plots (or, with --eval, the evaluation plot) as PNGs in this directory; "
      "they think with --steps, the other thinking options apply to the sampled text")
    s("--compile", action="store_true", help="torch.compile an EBT's tokens (context, thinking and choice in one "
      "graph): 3.6x the tokens/s on a CPU once compiled, but compiling takes 30-90 s, so it pays from a few "
      "thousand tokens")
    g = p.add_argument_group("thinking (EBT)")
    g.add_argument("--steps", type=int, help="thinking steps per token, may exceed training (default: as trained)")
    g.add_argument("--step_size", type=float, help="override the learned step size alpha")
    g.add_argument("--candidates", type=int, help="self-verification: think from N starts, keep the lowest energy")
    g.add_argument("--langevin_std", type=float, help="noise added to the logits before each step "
                   f"(default: {ebt.VERIFY_LANGEVIN_STD:g} with several candidates, the paper's, else 0)")
    g.add_argument("--tolerance", type=float, help="adaptive: stop a token once its energy falls by less than this")
    g.add_argument("--init_std", type=float, help="std of the random starting logits (default: as trained)")
    m = p.add_argument_group("other modes")
    m.add_argument("--eval", action="store_true", help="perplexity vs thinking steps and candidates on val and OOD text")
    m.add_argument("--data", help="--eval: the training corpus, a text file or a prepared folder, whose last 10%% is "
                   "the validation split (default: the checkpoint's own, recorded at training)")
    m.add_argument("--ood", help="--eval: out-of-distribution text file (default: Python's pydoc_data.topics)")
    m.add_argument("--windows", type=int, default=64, help="--eval: random windows of block_size tokens per text (default: %(default)s)")
    args = p.parse_args(argv)
    cli.check_sampling(args)
    if args.plots:
        rundir.check_out_dir(args.plots, "--plots")
    if args.eval:
        for name in ("steps", "step_size", "candidates", "langevin_std", "tolerance", "top_k"):
            if getattr(args, name) is not None:
                raise ebt.UsageError(f"--{name} applies to sampling; --eval sweeps thinking steps and candidates "
                                     "itself, as trained")
    return args


def training_corpus(ckpt_path, data=None):
    """The corpus a checkpoint was trained on: data if given, else the one it recorded (None: Tiny
    Shakespeare), checked to be the same (data/prepare.py)."""
    ckpt = rundir.load_checkpoint(ckpt_path)
    corpus = prepare.corpus(data or (ckpt.get("data") or {}).get("path"), ckpt["tokenizer"]["kind"],
                            say=lambda line: print(line, file=sys.stderr))  # stdout is for the results
    corpus.check_trained_on(ckpt, ckpt_path, "pass that corpus with --data (another text goes in --ood)")
    return corpus


def evaluate_thinking(model, tokenizer, corpus, args):
    val, ood, dropped = validation_and_ood(tokenizer, corpus, read_text(args.ood, "--ood") if args.ood else None)
    ood_name = Path(args.ood).name if args.ood else "pydoc_data.topics"
    print(f"OOD text {ood_name}: {len(ood)} tokens kept, {dropped} characters outside the vocabulary dropped")
    if dropped > 0.1 * (len(ood) + dropped):
        print(f"warning: {100 * dropped / (len(ood) + dropped):.0f}% of {ood_name} is outside the model's vocabulary "
              "and was dropped: its perplexity is of what is left", file=sys.stderr)
    trained = model.trained_steps() if isinstance(model, ebt.Thinker) else 1
    steps = sorted({1, 2, 3, *(k * trained for k in range(1, ebt.THINK_LONGER + 1))})
    sources = {"val": val, f"OOD: {ood_name}": ood}
    results = {name: thinking_curves(model, ids, steps, windows=args.windows) for name, ids in sources.items()}
    print(thinking_table(results, trained))
    thinks = isinstance(model, ebt.TextEBT)
    if thinks:
        print(verifier_table(results))
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        plot_thinking_curves(results, trained).savefig(Path(args.plots) / "thinking_curves.png", dpi=90)
        if thinks:
            plot_verifier(results).savefig(Path(args.plots) / "verifier.png", dpi=90)
        print(f"saved {'thinking_curves.png and verifier.png' if thinks else 'thinking_curves.png'} in {args.plots}")


def main(argv=None):
    args = parse_args(argv)
    device = cli.pick_device(args.device)
    torch.manual_seed(args.seed)
    best = Path(args.out_dir) / "best.pt"  # the run at its lowest validation loss, else its last checkpoint
    ckpt = args.ckpt or (best if best.exists() else Path(args.out_dir) / "ckpt.pt")
    thinking = {k: getattr(args, k) for k in ("steps", "step_size", "candidates", "langevin_std", "tolerance")
                if getattr(args, k) is not None}
    overrides = {} if args.init_std is None else {"init_std": args.init_std}
    model, tokenizer = rundir.load_text_model(ckpt, device, **overrides)
    if args.compile:
        compiled.compile_model(model)
        print("compiling: the first tokens take 30-90 s", file=sys.stderr, flush=True)
    if args.eval:
        return evaluate_thinking(model, tokenizer, training_corpus(ckpt, args.data), args)
    if args.plots:
        rundir.require_ebt(model, "--plots")
    idx = torch.tensor([tokenizer.encode(args.prompt)], device=device)
    t0 = time.time()
    progress = lambda n: n % 1000 == 0 and print(f"{n}/{args.num_tokens} tokens, {time.time() - t0:.0f}s",
                                                 file=sys.stderr, flush=True)
    out = ebt.generate(model, idx, args.num_tokens, args.temperature, args.top_k,
                       torch.Generator().manual_seed(args.seed), on_token=progress if args.num_tokens >= 2000 else None,
                       **thinking)
    text = tokenizer.decode(out.idx[0].tolist())
    print(text)
    summary = f"{args.num_tokens} tokens in {time.time() - t0:.1f}s from {ckpt}"
    if out.energy is not None and args.num_tokens:
        summary += (f" | final energy mean {out.energy.mean():.3f} (max {out.energy.max():.3f})"
                    f" | steps used mean {out.steps_used.float().mean():.2f} (max {out.steps_used.max()})")
    print(summary, file=sys.stderr)
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        for name, plot in PLOTS.items():  # the last 64 characters: readable labels
            fig, _ = plot(model, tokenizer, text[-65:], steps=args.steps, seed=args.seed)
            fig.savefig(Path(args.plots) / f"{name}.png", dpi=90)
        if args.num_tokens:
            plot_generation(model, out)[0].savefig(Path(args.plots) / "generation.png", dpi=90)
        print(f"saved {len(PLOTS) + bool(args.num_tokens)} plots in {args.plots}", file=sys.stderr)


if __name__ == "__main__":
    cli.invoke(main)
