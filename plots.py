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
