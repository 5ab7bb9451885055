"""
Train an image denoising EBT (or its one-pass baseline) and compare them.

    python train_image.py --model ebt                  # the photo matplotlib ships, no download
    python train_image.py --model baseline             # the same transformer, one forward pass
    python train_image.py --compare out-image-ebt out-image-baseline
    python train_image.py --dataset mnist              # or cifar10: downloaded once and cached
    python train_image.py --data my_photos/            # a folder of PNG / JPEG files
    python train_image.py --model ebt --resume         # continue out-image-ebt/ckpt.pt

Training ends with a report in out_dir (also what --compare writes, for several checkpoints):
psnr.md, PSNR of the noisy input, the baseline and the EBT after each thinking step at the
training noise level and higher ones; psnr.png, the same against forward passes; grid.png, a
few denoised validation crops; energy.png, the mean energy along the thinking steps.
"""
import math
import os
from pathlib import Path

import torch

import ebt

REPORT_CROPS = 128  # validation crops behind every number in the report
GRID_CROPS = 4      # rows of grid.png: the report crops with the most detail (pixel std)


def parse_args(argv=None):
    p = ebt.ArgumentParser(description=__doc__)
    m, t, s = ebt.ModelConfig(), ebt.TrainConfig(), p.add_argument
    s("--model", choices=("ebt", "baseline"), default="ebt", help="(default: %(default)s)")
    s("--compare", nargs="+", metavar="OUT_DIR", help="report on trained checkpoints instead of training")
    s("--dataset", choices=("photos", "mnist", "cifar10"), default="photos",
      help="photos: matplotlib's sample photo, bottom fifth held out (default: %(default)s)")
    s("--data", help="a folder of PNG/JPEG images instead (bottom fifth of each held out)")
    s("--image_size", type=int, help="crop size (default: 28 for mnist, else 32)")
    s("--patch_size", type=int, default=m.patch_size, help="(default: %(default)s)")
    s("--n_layer", type=int, default=3, help="(default: %(default)s)")
    s("--n_head", type=int, default=4, help="(default: %(default)s)")
    s("--n_embd", type=int, default=96, help="(default: %(default)s)")
    s("--noise_std", type=float, default=0.1, help="training noise, pixels in [0, 1] (default: %(default)s)")
    s("--eval_noise", type=float, nargs="+", help="report noise levels (default: 1x, 2x, 3x --noise_std)")
    g = p.add_argument_group("thinking (EBT)")
    g.add_argument("--think_steps", type=int, default=m.think_steps, help="descent steps in training (default: %(default)s)")
    g.add_argument("--step_size", type=float, default=400.0,
                   help="initial alpha; grows with the number of patches, energy is their mean (default: %(default)s)")
    g.add_argument("--step_size_lr_mult", type=float, help="alpha's lr / base lr (default: 3x --step_size)")
    g.add_argument("--eval_steps", type=int, default=t.eval_steps, help="thinking steps at evaluation, 0 = 2x think_steps (default: %(default)s)")
    g.add_argument("--report_steps", type=int, help="thinking steps in the report (default: 4x think_steps)")
    s("--max_steps", type=int, default=800, help="(default: %(default)s)")
    s("--batch_size", type=int, default=32, help="(default: %(default)s)")
    s("--lr", type=float, default=1e-3, help="(default: %(default)s)")
    s("--warmup_steps", type=int, default=50, help="(default: %(default)s)")
    s("--weight_decay", type=float, default=t.weight_decay, help="(default: %(default)s)")
    s("--grad_clip", type=float, default=t.grad_clip, help="0 = off (default: %(default)s)")
    s("--eval_interval", type=int, default=200, help="(default: %(default)s)")
    s("--eval_batches", type=int, default=4, help="(default: %(default)s)")
    s("--log_interval", type=int, default=50, help="(default: %(default)s)")
    s("--out_dir", help="checkpoint, metrics and report (default: out-image-MODEL, or out-image-compare)")
    s("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
    s("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps (default: %(default)s)")
    s("--seed", type=int, default=t.seed, help="(default: %(default)s)")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or ("out-image-compare" if args.compare else f"out-image-{args.model}")
    ebt.check_flag(args.image_size, "image_size", lambda v: v >= 1, ">= 1")
    ebt.check_flag(args.report_steps, "report_steps", lambda v: v >= 1, ">= 1")
    for level in args.eval_noise or ():
        ebt.check_noise_std(level)
    ebt.check_noise_std(args.noise_std)
    return args


def load_data(spec):
    """ImageData from a spec stored in checkpoints: dataset, data folder, crop size, noise."""
    if spec["dataset"] in ("mnist", "cifar10"):
        train, val = ebt.download_dataset(spec["dataset"])  # their own train / test split
        source = spec["dataset"]
    else:
        named = ebt.image_folder(spec["data"]) if spec["dataset"] == "folder" else ebt.sample_photos()
        train, val = ebt.held_out_strips(named, spec["image_size"])
        source = spec["data"] or "matplotlib's sample photo"
    return ebt.ImageData(train, val, spec["image_size"], spec["noise_std"], source=source)


def train(args):
    kind = "image_" + args.model
    ckpt = ebt.resume_checkpoint(args.out_dir, kind) if args.resume else None
    if ckpt:
        spec, cfg = ckpt["image_data"], ebt.ModelConfig.from_dict(ckpt["model_config"])
    else:
        dataset = "folder" if args.data else args.dataset
        spec = {"dataset": dataset, "data": args.data, "noise_std": ebt.check_noise_std(args.noise_std),
                "image_size": args.image_size or (28 if dataset == "mnist" else 32)}
    data = load_data(spec)
    if not ckpt:
        cfg = ebt.ModelConfig(
            model=kind, channels=data.channels, image_size=spec["image_size"], patch_size=args.patch_size,
            n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, think_steps=args.think_steps,
            landscapes=args.think_steps,
            step_size=args.step_size, step_size_lr_mult=args.step_size_lr_mult or 3 * args.step_size)
    tc = ebt.TrainConfig(max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                         warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                         eval_interval=args.eval_interval, eval_batches=args.eval_batches,
                         eval_steps=args.eval_steps, log_interval=args.log_interval, out_dir=args.out_dir,
                         device=args.device, seed=args.seed)
    model = ebt.build_model(cfg, args.seed)
    ebt.train(model, data, tc, meta={"image_data": spec}, resume=bool(ckpt))
    return {args.model: model.eval()}, data


def load_trained(dirs, device):
    """The EBT and/or baseline checkpoints in dirs, and the data the first was trained on."""
    models, spec = {}, None
    for d in dirs:
        ckpt = ebt.load_checkpoint(Path(d) / "ckpt.pt", device)
        if "image_data" not in ckpt:
            raise ebt.UsageError(f"{d}/ckpt.pt is not an image model checkpoint")
        if spec and ckpt["image_data"] != spec:
            raise ebt.UsageError(f"{d} was trained on other data than {dirs[0]} ({ckpt['image_data']} vs {spec})")
        spec = ckpt["image_data"]
        models[ckpt["model_config"]["model"].removeprefix("image_")] = ebt.model_from_checkpoint(ckpt, device).eval()
    return models, load_data(spec)


def denoise_all(models, noisy, steps):
    """Every prediction for one noisy batch: {"noisy", "baseline", "ebt 1".."ebt K"} -> images,
    plus the EBT's mean energy at steps 0..K."""
    out, energies = {"noisy": noisy}, []
    if "baseline" in models:
        with torch.no_grad():
            out["baseline"] = models["baseline"].denoise(noisy)
    if "ebt" in models:
        traj = models["ebt"].predict(noisy, steps)
        out.update({f"ebt {k}": y for k, y in enumerate(traj.ys[1:], 1)})
        energies = [e.mean().item() for e in traj.energies]
    return out, energies


def report(models, data, args, device):
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    think_steps = models["ebt"].config.think_steps if "ebt" in models else 0
    steps = args.report_steps or 4 * think_steps
    train_std = data.noise_std
    levels = [ebt.check_noise_std(s) for s in args.eval_noise or (train_std, 2 * train_std, 3 * train_std)]
    g = torch.Generator().manual_seed(args.seed + 2)
    _, clean = data.batch("val", REPORT_CROPS, generator=g)
    clean = clean.to(device)
    detailed = clean.flatten(1).std(1).topk(GRID_CROPS).indices
    rows, curves, grid = [], {}, None
    for level in levels:
        noisy = clean + level * torch.randn(clean.shape, generator=g).to(device)
        preds, curves[level] = denoise_all(models, noisy, steps)
        rows.append([ebt.psnr(y, clean).mean().item() for y in preds.values()])
        if grid is None:  # the first level is the training level
            grid = {name: y[detailed] for name, y in preds.items()} | {"clean": clean[detailed]}
    names = [name + (" (1 pass)" if name == "baseline" else "") for name in preds]
    table = ["| noise std | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for level, row in zip(levels, rows):
        seen = "trained" if math.isclose(level, train_std) else "unseen"
        table.append(f"| {level:g} ({seen}) | " + " | ".join(f"{v:.2f}" for v in row) + " |")
    text = f"PSNR (dB) on {REPORT_CROPS} held-out {data.crop}x{data.crop} crops"
    if "ebt" in models:
        text += (f"; 'ebt k' = after k thinking steps, one forward and one backward pass each "
                 f"(trained with {think_steps})")
    text += ".\n\n" + "\n".join(table) + "\n"
    (out / "psnr.md").write_text(text)
    print(text)
    plot_grid(grid, out / "grid.png")
    plot_psnr(dict(zip(levels, rows)), list(preds), train_std, out / "psnr.png")
    written = [out / "psnr.md", out / "psnr.png", out / "grid.png"]
    if "ebt" in models:
        plot_energy(curves, train_std, out / "energy.png")
        written.append(out / "energy.png")
    print("wrote " + ", ".join(map(str, written)))


def plot_grid(columns, path):
    """One row per crop: noisy, baseline, EBT after each step, clean."""
    from matplotlib.figure import Figure  # no pyplot: nothing global to set up or close
    n_rows, n_cols = next(iter(columns.values())).shape[0], len(columns)
    fig = Figure(figsize=(0.8 * n_cols, 0.8 * n_rows + 0.3))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for c, (name, images) in enumerate(columns.items()):
        axes[0, c].set_title(name, fontsize=7)
        for r in range(n_rows):
            img = images[r].detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            axes[r, c].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1,
                             interpolation="nearest")
            axes[r, c].axis("off")
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=80)


def plot_psnr(rows, names, train_std, path):
    """PSNR against forward passes, one panel per noise level: the EBT's k-th thinking step
    is its k-th forward pass (plus a backward), the baseline is a single pass."""
    from matplotlib.figure import Figure  # no pyplot: nothing global to set up or close
    fig = Figure(figsize=(3.2 * len(rows), 3.2), layout="constrained")
    for ax, (level, row) in zip(fig.subplots(1, len(rows), squeeze=False)[0], rows.items()):
        values = dict(zip(names, row))
        ebt_steps = [n for n in names if n.startswith("ebt ")]
        if ebt_steps:
            ax.plot(range(1, len(ebt_steps) + 1), [values[n] for n in ebt_steps], marker="o", label="EBT")
        if "baseline" in values:
            ax.axhline(values["baseline"], color="C1", ls="--", label="baseline (1 pass)")
            ax.plot([1], [values["baseline"]], marker="s", color="C1")
        ax.axhline(values["noisy"], color="gray", ls=":", label="noisy input")
        seen = "trained" if math.isclose(level, train_std) else "unseen"
        ax.set(title=f"noise std {level:g} ({seen})", xlabel="forward passes", ylabel="PSNR (dB)")
        ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)


def plot_energy(curves, train_std, path):
    from matplotlib.figure import Figure  # no pyplot: nothing global to set up or close
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for level, energies in curves.items():
        label = f"noise std {level:g}" + (" (trained)" if math.isclose(level, train_std) else "")
        ax.plot(range(len(energies)), energies, marker="o", label=label)
    ax.set_xlabel("thinking step (0 = the noisy input)")
    ax.set_ylabel("mean energy")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    args = parse_args(argv)
    device = ebt.pick_device(args.device)
    if args.compare:
        models, data = load_trained(args.compare, device)
    else:
        models, data = train(args)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one report
        report(models, data, args, device)


if __name__ == "__main__":
    ebt.run_cli(main)
