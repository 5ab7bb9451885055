"""
Train an image denoising EBT, or one of its baselines on the same transformer, and compare them.

    python train_image.py --model ebt                  # the photo matplotlib ships, no download; recipe S1
    python train_image.py --model ebt --recipe s2 --out_dir out-image-ebt-s2
    python train_image.py --model dit                  # Diffusion Transformer: predicts the noise, DDIM
    python train_image.py --model regressor            # one forward pass to the clean image
    python train_image.py --compare out-image-ebt out-image-ebt-s2 out-image-dit out-image-regressor
    python train_image.py --dataset mnist              # or cifar10: downloaded once and cached
    python train_image.py --data my_photos/            # a folder of PNG / JPEG files

The noise is the DDPM forward process of the paper's image runs (linear betas over 1000 steps,
images in [-1, 1]): training at step t = 99 (the DiT: t in 1..99), the report at t = 99 (in
distribution), 199 and 299 (out of distribution). Training ends with a report in out_dir (also
what --compare writes, for several checkpoints): psnr.md, PSNR against forward passes of every
model at every noise level; psnr.png, the same as a plot; grid.png, a few denoised validation
crops; energy.png (an EBT's), the mean energy along the thinking steps.
"""
import os
import urllib.request
from pathlib import Path

import torch

import ebt

REPORT_CROPS = 128  # validation crops behind every number in the report
GRID_CROPS = 4      # rows of grid.png: the report crops with the most detail (pixel std)
DIT_PASSES = (1, 3, 10, 30, 100)
RECIPES = {  # the image EBT: S1 as the paper's image runs (one step); S2 with the text S2's structure
    "s1": dict(think_steps=1, landscapes=1, random_steps=0, random_step_size=1.0, truncate=False, detach=True),
    "s2": dict(think_steps=2, landscapes=1, random_steps=1, random_step_size=2.0, truncate=True, detach=False),
}
CACHE_DIR = Path(os.environ.get("NANOEBT_CACHE", Path.home() / ".cache" / "nanoebt"))
_m, _t = ebt.ModelConfig(), ebt.TrainConfig()
MODEL_DEFAULTS = dict(patch_size=_m.patch_size, n_layer=3, n_head=4, n_embd=96, noise_t=_m.noise_t, step_size=1000.0)
TRAIN_DEFAULTS = dict(max_steps=800, batch_size=32, lr=1e-3, warmup_steps=50, weight_decay=_t.weight_decay,
                      grad_clip=_t.grad_clip, eval_interval=200, eval_batches=4, eval_steps=_t.eval_steps,
                      log_interval=50, seed=_t.seed)


def parse_args(argv=None):
    # model and training flags default to None, so that a resumed run knows what was given
    p = ebt.ArgumentParser(description=__doc__)
    s = p.add_argument
    default = lambda k, note="": f"{note}(default: {MODEL_DEFAULTS.get(k, TRAIN_DEFAULTS.get(k))})"
    s("--model", choices=("ebt", "dit", "regressor"), default="ebt", help="(default: %(default)s)")
    s("--recipe", choices=RECIPES, help="the EBT's (default: s1)")
    s("--compare", nargs="+", metavar="OUT_DIR", help="report on trained checkpoints instead of training")
    s("--dataset", choices=("photos", "mnist", "cifar10"),
      help="photos: matplotlib's sample photo, bottom fifth held out (default: photos)")
    s("--data", help="a folder of PNG/JPEG images instead (bottom fifth of each held out)")
    s("--image_size", type=int, help="crop size (default: 28 for mnist, else 32)")
    for k in ("patch_size", "n_layer", "n_head", "n_embd"):
        s(f"--{k}", type=int, help=default(k))
    s("--noise_t", type=int, help=default("noise_t", "training noise, a DDPM step "))
    s("--eval_t", type=int, nargs="+", help="report noise levels, DDPM steps (default: k (noise_t + 1) - 1 for "
      "k = 1, 2, 3 up to 1000: 99 199 299)")
    s("--passes", type=int, nargs="+", default=list(DIT_PASSES), help="the DiT's DDIM passes in the report "
      "(default: %(default)s)")
    g = p.add_argument_group("thinking (EBT)")
    g.add_argument("--step_size", type=float, help=default(
        "step_size", "initial alpha; grows with the number of patches, the energy is their mean "))
    g.add_argument("--step_size_lr_mult", type=float, help="alpha's lr / base lr (default: 3x --step_size)")
    g.add_argument("--eval_steps", type=int, help=default("eval_steps", "thinking steps at evaluation, 0 = 2x trained "))
    g.add_argument("--report_steps", type=int, help="thinking steps in the report (default: 4x the trained steps)")
    for k, kind in (("max_steps", int), ("batch_size", int), ("lr", float), ("warmup_steps", int),
                    ("weight_decay", float), ("grad_clip", float), ("eval_interval", int), ("eval_batches", int),
                    ("log_interval", int)):
        s(f"--{k}", type=kind, help=default(k, "0 = off " if k == "grad_clip" else ""))
    s("--out_dir", help="checkpoint, metrics and report (default: out-image-MODEL, or out-image-compare)")
    s("--resume", action="store_true", help="continue from out_dir/ckpt.pt with its settings; training flags "
      "given override them, model and data flags must agree")
    s("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps (default: %(default)s)")
    s("--seed", type=int, help=default("seed"))
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or ("out-image-compare" if args.compare else f"out-image-{args.model}")
    if args.data and args.dataset:
        raise ebt.UsageError(f"--data {args.data} and --dataset {args.dataset}: give one (--data is a folder of images)")
    if Path(args.out_dir).is_file():
        raise ebt.UsageError(f"--out_dir {args.out_dir} is a file, not a directory; pass a directory")
    if args.model != "ebt" and not args.compare:
        thinking = ebt.given_flags(args, ("recipe", "step_size", "step_size_lr_mult", "eval_steps"))
        if thinking:
            raise ebt.UsageError(f"--{next(iter(thinking))} is an EBT option; the {args.model} does not think")
    ebt.check_flag(args.image_size, "image_size", lambda v: v >= 1, ">= 1")
    ebt.check_flag(args.report_steps, "report_steps", lambda v: v >= 1, ">= 1")
    for name, values in (("noise_t", [args.noise_t]), ("eval_t", args.eval_t or [])):
        for v in values:
            ebt.check_flag(v, name, lambda v: 1 <= v <= ebt.DDPM_STEPS, f"a DDPM step in 1..{ebt.DDPM_STEPS}")
    ebt.check_flag(min(args.passes), "passes", lambda v: v >= 1, ">= 1")
    return args


# Image data: images are (C, H, W) tensors, float in [0, 1] or uint8 (the downloaded datasets,
# four times smaller in memory); batches are in [-1, 1].

class ImageData:
    """Random square crops: batch -> (clean crops in [-1, 1], Gaussian noise of the same shape);
    each model noises the crops itself (the EBT and the regressor at t = noise_t, the DiT at a
    random t up to it)."""

    def __init__(self, train, val, crop, source="images"):
        """train, val: sequences of (C, H, W) images (a list, or one (N, C, H, W) tensor)."""
        for split, images in (("train", train), ("val", val)):
            if len(images) == 0:
                raise ebt.UsageError(f"{source}: no {split} images")
            if min(min(img.shape[-2:]) for img in images) < crop:
                raise ebt.UsageError(f"{source}: some {split} images are smaller than the {crop}x{crop} crop; "
                                     "use a smaller --image_size")
        self.split = {"train": train, "val": val}
        self.crop, self.channels = crop, train[0].shape[0]
        self.tokens_per_sample = crop * crop  # pixels count as tokens in the throughput log

    def batch(self, split, batch_size, generator):
        images, S, g = self.split[split], self.crop, generator
        crops = []
        for i in torch.randint(len(images), (batch_size,), generator=g).tolist():
            H, W = images[i].shape[-2:]
            top, left = (int(torch.randint(n - S + 1, (), generator=g)) for n in (H, W))
            crops.append(images[i][:, top:top + S, left:left + S])
        clean = torch.stack(crops)
        clean = clean.float() / 255 if clean.dtype == torch.uint8 else clean
        return 2 * clean - 1, torch.randn(clean.shape, generator=g)


def read_image(path):
    """A PNG or JPEG file as a (3, H, W) float tensor in [0, 1] (gray is repeated, alpha dropped)."""
    import matplotlib.image
    try:
        a = matplotlib.image.imread(path)
    except Exception as e:
        raise ebt.UsageError(f"{path} is not a readable PNG or JPEG image ({type(e).__name__})") from None
    a = torch.from_numpy(a.copy())
    a = a.float() if a.is_floating_point() else a.float() / 255  # PNG reads as float, JPEG as uint8
    a = a[..., None] if a.dim() == 2 else a                       # (H, W, channels)
    a = a[..., :1].expand(-1, -1, 3) if a.shape[-1] <= 2 else a[..., :3]  # gray to RGB, drop alpha
    return a.permute(2, 0, 1).contiguous()


def image_folder(path):
    """Every PNG or JPEG file in a folder, as (name, (3, H, W) image) pairs."""
    path = Path(path)
    if not path.is_dir():
        raise ebt.UsageError(f"--data {path} " + ("is a file; pass a folder of images" if path.exists() else "does not exist"))
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise ebt.UsageError(f"image folder {path} has no PNG or JPEG files")
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
            raise ebt.UsageError(f"{name} is {H}x{W} pixels: too small for {crop}x{crop} crops plus a held-out "
                             f"strip (needs at least {2 * crop} rows and {crop} columns); use a smaller --image_size")
        train.append(img[:, :H - n_val])
        val.append(img[:, H - n_val:])
    return train, val


def download(url, path, hint="pass a local copy with --data PATH"):
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
        raise ebt.UsageError(f"could not download {url} ({e}); {hint}") from None
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


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
        raise ebt.UsageError(f"{path} is not a gzipped uint8 IDX file")
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
        raise ebt.UsageError(f"{path} is not the CIFAR-10 python tarball (no data_batch_* / test_batch)")
    return tuple(np.concatenate(parts).reshape(-1, 3, 32, 32) for parts in (train, test))


def download_dataset(name):
    """MNIST or CIFAR-10 as (train, val) uint8 tensors (N, C, H, W), downloaded once and cached."""
    import pickle
    import tarfile
    hint = lambda p: f"no network? put the file at {p}, or use the default photos or --data DIR"

    def read(reader, path):  # a cached file cut short (or not the dataset) is named, not traced back
        try:
            return reader(path)
        except (OSError, EOFError, ValueError, tarfile.TarError, pickle.UnpicklingError) as e:
            raise ebt.UsageError(f"{path} is corrupt or truncated ({type(e).__name__}); delete it to download it "
                                 "again") from None
    if name == "mnist":
        split = []
        for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
            path = download(MNIST_URL + f, CACHE_DIR / "mnist" / f, hint=hint(CACHE_DIR / "mnist" / f))
            split.append(torch.from_numpy(read(read_idx, path).copy())[:, None])  # (N, 1, 28, 28)
        return tuple(split)
    path = CACHE_DIR / "cifar-10-python.tar.gz"
    train, test = read(read_cifar10, download(CIFAR10_URL, path, hint=hint(path)))
    return torch.from_numpy(train), torch.from_numpy(test)


def resume_checkpoint(out_dir, model_kind):
    """The checkpoint to resume in out_dir, checked to hold the same kind of model."""
    path = Path(out_dir) / "ckpt.pt"
    ckpt = ebt.load_checkpoint(path)
    if ckpt["model_config"].get("model") != model_kind:
        raise ebt.UsageError(f"checkpoint {path} holds a {ckpt['model_config'].get('model')!r} model, not "
                         f"{model_kind!r}; use the same --model or another --out_dir")
    return ckpt


def load_data(spec):
    """ImageData from a spec stored in checkpoints: dataset, data folder, crop size."""
    if spec["dataset"] in ("mnist", "cifar10"):
        train, val = download_dataset(spec["dataset"])  # their own train / test split
        source = spec["dataset"]
    else:
        named = image_folder(spec["data"]) if spec["dataset"] == "folder" else sample_photos()
        train, val = held_out_strips(named, spec["image_size"])
        source = spec["data"] or "matplotlib's sample photo"
    return ImageData(train, val, spec["image_size"], source=source)


def resumed_configs(args, ckpt):
    """The checkpoint's configs and data; training flags given override them, the rest must agree."""
    spec, cfg = ckpt["image_data"], ebt.ModelConfig.from_dict(ckpt["model_config"])
    dataset = "folder" if args.data else args.dataset
    model_flags = ebt.given_flags(args, (*MODEL_DEFAULTS, "step_size_lr_mult"))
    agree = {**{k: (v, getattr(cfg, k)) for k, v in model_flags.items()},
             **{k: (v, spec[k]) for k, v in dict(image_size=args.image_size, data=args.data, dataset=dataset).items()
                if v is not None}}
    if args.recipe:
        agree["recipe"] = (args.recipe, next((r for r, kw in RECIPES.items()
                                              if all(getattr(cfg, k) == v for k, v in kw.items())), "another"))
    for k, (v, saved) in agree.items():
        if v != saved:
            raise ebt.UsageError(f"--{k} {v} conflicts with the checkpoint's {saved}; resume without it, "
                                 "or start a new run in another --out_dir")
    train = {k: v for k, v in ckpt["train_config"].items() if k in TRAIN_DEFAULTS}
    for k, v in ebt.given_flags(args, TRAIN_DEFAULTS).items():
        if train[k] != v:
            print(f"notice: --{k} {v} overrides the checkpoint's {train[k]}")
            train[k] = v
    return spec, cfg, train


def train(args):
    kind = "image_" + args.model
    ckpt = resume_checkpoint(args.out_dir, kind) if args.resume else None
    if ckpt:
        spec, cfg, train_values = resumed_configs(args, ckpt)
        data = load_data(spec)
    else:
        dataset = "folder" if args.data else args.dataset or "photos"
        spec = {"dataset": dataset, "data": args.data, "image_size": args.image_size or (28 if dataset == "mnist" else 32)}
        data = load_data(spec)
        values = {**MODEL_DEFAULTS, **ebt.given_flags(args, MODEL_DEFAULTS)}
        thinking = RECIPES[args.recipe or "s1"] if args.model == "ebt" else {}
        cfg = ebt.ModelConfig(model=kind, channels=data.channels, image_size=spec["image_size"], **values,
                              step_size_lr_mult=args.step_size_lr_mult or 3 * values["step_size"], **thinking)
        train_values = {**TRAIN_DEFAULTS, **ebt.given_flags(args, TRAIN_DEFAULTS)}
    tc = ebt.TrainConfig(**train_values, out_dir=args.out_dir, device=args.device)
    model = ebt.build_model(cfg, tc.seed)
    ebt.train(model, data, tc, meta={"image_data": spec}, resume=bool(ckpt))
    return {Path(args.out_dir).name: model.eval()}, data


def load_trained(dirs, device):
    """The image models in dirs (named by their directories), and the data they were trained on."""
    models, spec = {}, None
    for d in dirs:
        ckpt = ebt.load_checkpoint(Path(d) / "ckpt.pt", device)
        if "image_data" not in ckpt:
            raise ebt.UsageError(f"{d}/ckpt.pt is not an image model checkpoint")
        if spec and ckpt["image_data"] != spec:
            raise ebt.UsageError(f"{d} was trained on other data than {dirs[0]} ({ckpt['image_data']} vs {spec})")
        spec, name = ckpt["image_data"], Path(d).resolve().name
        if name in models:
            raise ebt.UsageError(f"two --compare directories are named {name}; the report names models by "
                                 "their directory, so give them different names")
        try:
            models[name] = ebt.model_from_checkpoint(ckpt, device).eval()
        except (RuntimeError, KeyError, TypeError) as e:
            raise ebt.UsageError(f"{d}/ckpt.pt does not fit its own config ({str(e).splitlines()[0]})") from None
    return models, load_data(spec)


def denoise_all(models, noisy, t, passes, steps):
    """Every model's denoising of one batch noised to step t: {(name, forward passes): images}, and
    each EBT's mean energy along its steps (on each step's landscape)."""
    out, energies = {("noisy input", 0): noisy}, {}
    for name, model in models.items():
        kind = model.config.model
        if kind == "image_regressor":
            with torch.no_grad():
                out[name, 1] = model.denoise(noisy)
        elif kind == "image_dit":
            out.update({(name, p): model.denoise(noisy, t, p) for p in passes})
        else:
            traj = model.predict(noisy, steps or 4 * model.trained_steps())
            out.update({(name, k): y for k, y in enumerate(traj.ys[1:], 1)})
            energies[name] = [e.mean().item() for e in traj.energies]
    return out, energies


def report(models, data, args, device):
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained_t = next(iter(models.values())).config.noise_t
    levels = args.eval_t or [t for t in (k * (trained_t + 1) - 1 for k in (1, 2, 3)) if t <= ebt.DDPM_STEPS]
    g = torch.Generator().manual_seed((TRAIN_DEFAULTS["seed"] if args.seed is None else args.seed) + 2)
    clean, _ = data.batch("val", REPORT_CROPS, generator=g)
    clean = clean.to(device)
    detailed = clean.flatten(1).std(1).topk(GRID_CROPS).indices
    table, curves, grid = {}, {}, None
    for t in levels:
        noisy = ebt.ddpm_noise(clean, t, torch.randn(clean.shape, generator=g).to(device))
        preds, curves[t] = denoise_all(models, noisy, t, args.passes, args.report_steps)
        for key, y in preds.items():
            table.setdefault(key, {})[t] = ebt.psnr(y, clean).mean().item()
        if grid is None:  # the first level is the training level; an EBT as trained, a DiT at up to 10 passes
            shown = {name: getattr(model, "trained_steps", lambda: 10)() for name, model in models.items()}
            grid = {name: preds[name, max((p for (n, p) in preds if n == name and p <= shown.get(name, 0)),
                                          default=min(p for (n, p) in preds if n == name))][detailed]
                    for name, _ in preds} | {"clean": clean[detailed]}
    seen = lambda t: "trained" if t == trained_t else "unseen"
    lines = ["| model | forward passes | " + " | ".join(f"t = {t} ({seen(t)})" for t in levels) + " |",
             "|---|---|" + "---|" * len(levels)]
    lines += [f"| {name} | {p} | " + " | ".join(f"{row[t]:.2f}" for t in levels) + " |"
              for (name, p), row in table.items()]
    text = (f"PSNR (dB, images in [-1, 1]) on {REPORT_CROPS} held-out {data.crop}x{data.crop} crops, DDPM noise at step "
            "t; an EBT's forward passes are its thinking steps (each also a backward pass), a DiT's its DDIM "
            "steps.\n\n" + "\n".join(lines) + "\n")
    ebt.write_atomically(out / "psnr.md", lambda tmp: tmp.write_text(text))
    print(text)
    plot_grid(grid, out / "grid.png")
    plot_psnr(table, levels, trained_t, out / "psnr.png")
    written = [out / "psnr.md", out / "psnr.png", out / "grid.png"]
    if any(curves.values()):
        plot_energy(curves, trained_t, out / "energy.png")
        written.append(out / "energy.png")
    print("wrote " + ", ".join(map(str, written)))


def plot_grid(columns, path):
    """One row per crop: noisy, each model's denoising (an EBT after its trained steps, the DiT at
    its most passes up to 10), clean."""
    fig = ebt.figure(figsize=(0.9 * len(columns), 0.9 * GRID_CROPS + 0.4))
    axes = fig.subplots(GRID_CROPS, len(columns), squeeze=False)
    for c, (name, images) in enumerate(columns.items()):
        axes[0, c].set_title(name.removeprefix("out-image-"), fontsize=6)
        for r in range(GRID_CROPS):
            img = ((images[r].detach().float() + 1) / 2).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            axes[r, c].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1,
                              interpolation="nearest")
            axes[r, c].axis("off")
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=80)


def plot_psnr(table, levels, trained_t, path):
    """PSNR against forward passes, one panel per noise level, one curve per model."""
    fig = ebt.figure(figsize=(3.4 * len(levels), 3.3), layout="constrained")
    names = list(dict.fromkeys(name for name, _ in table))
    for ax, t in zip(fig.subplots(1, len(levels), squeeze=False)[0], levels):
        for i, name in enumerate(names):
            points = sorted((p, row[t]) for (n, p), row in table.items() if n == name)
            if name == "noisy input":
                ax.axhline(points[0][1], color="gray", ls=":", label=name)
            elif len(points) == 1:  # one pass
                ax.axhline(points[0][1], color=f"C{i}", ls="--", lw=1)
                ax.plot(*points[0], marker="s", color=f"C{i}", label=name.removeprefix("out-image-"))
            else:
                ax.plot(*zip(*points), marker="o", ms=3, color=f"C{i}", label=name.removeprefix("out-image-"))
        ax.set(xscale="log", title=f"t = {t} ({'trained' if t == trained_t else 'unseen'})",
               xlabel="forward passes", ylabel="PSNR (dB)")
        ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.savefig(path, dpi=90)


def plot_energy(curves, trained_t, path):
    fig = ebt.figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for t, per_model in curves.items():
        for name, energies in per_model.items():
            label = f"{name.removeprefix('out-image-')}, t = {t}" + (" (trained)" if t == trained_t else "")
            ax.plot(range(len(energies)), energies, marker="o", label=label)
    ax.set(xlabel="thinking step (0 = the noisy input; each on its step's landscape)", ylabel="mean energy")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
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
