"""
The plots of the drivers' reports: train_image.py's grid.png, psnr.png and energy.png.
"""
import cli


# -----------------------------------------------------------------------------
# Image denoising

def short(name):
    """A model's name in the plots: its directory's, without the out-/image- prefixes every run shares."""
    return name.removeprefix("out-").removeprefix("image-")


def plot_grid(columns, path):
    """One row per crop: noisy, each model's denoising (an EBT after its trained steps, the DiT at
    its most passes up to 10), clean."""
    rows = len(columns["clean"])
    fig = cli.figure(figsize=(1.2 * len(columns), 1.2 * rows + 0.4))
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
    fig = cli.figure(figsize=(3.4 * len(levels) + 1.4, 3.3), layout="constrained")
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
    fig = cli.figure(figsize=(6, 4), layout="constrained")
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

