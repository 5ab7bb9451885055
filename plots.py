"""
Figures: what a run, its thinking and its images look like. sample.py, results.py, train_image.py, the training
log and the notebook import these.
"""
import itertools
from pathlib import Path


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


def plot_metrics(records, path):
    """Loss curve PNG from the metrics log: the training loss smoothed (raw, faint), and the validation
    loss (an EBT's after 1, the trained and the most evaluated thinking steps)."""
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
    images = any(r["kind"] == "start" and r.get("model", "").startswith("image_") for r in records)
    ax.set(xlabel="optimizer step", ylabel="loss (smooth L1 on pixels in [-1, 1])" if images else "loss (nats per token)",
           title=f"training: {Path(path).parent.name}")
    if ax.get_legend_handles_labels()[0]:  # nothing yet when stopped before the first log
        ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)


# -----------------------------------------------------------------------------
# Image denoising

def short(name):
    """A model's name in the plots: its directory's, without the out-/image- prefixes every run shares."""
    return name.removeprefix("out-").removeprefix("image-")


def plot_grid(columns, path):
    """One row per crop: noisy, each model's denoising (an EBT after its trained steps, the DiT at
    its most passes up to 10), clean."""
    rows = len(columns["clean"])
    fig = figure(figsize=(1.2 * len(columns), 1.2 * rows + 0.4))
    axes = fig.subplots(rows, len(columns), squeeze=False)
    for c, (name, images) in enumerate(columns.items()):
        axes[0, c].set_title(short(name), fontsize=9)
        for r in range(rows):
            img = ((images[r].detach().float() + 1) / 2).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            axes[r, c].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1,
                              interpolation="nearest")
            axes[r, c].axis("off")
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=90)


def plot_psnr(table, levels, trained_t, path):
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
        ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right center", fontsize=9)
    fig.savefig(path, dpi=90)


def plot_energy(curves, trained_t, path):
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
    fig.savefig(path, dpi=100)

