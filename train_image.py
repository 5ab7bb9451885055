"""
Train an image denoising EBT, or one of its baselines on the same transformer, and compare them.

    python train_image.py --model ebt                  # photographs, tested on others; recipe S1
    python train_image.py --model ebt --recipe s2 --out_dir out-image-ebt-s2
    python train_image.py --model dit                  # Diffusion Transformer: predicts the noise, DDIM
    python train_image.py --model regressor            # one forward pass to the clean image
    python train_image.py --compare out-image-ebt out-image-ebt-s2 out-image-dit out-image-regressor
    python train_image.py --dataset grace_hopper       # matplotlib's one photograph (no scikit-image)
    python train_image.py --dataset mnist              # or cifar10: downloaded once and cached
    python train_image.py --data my_photos/            # a folder of PNG / JPEG files

The default data (--dataset photos) are whole colour photographs, no download: four to train on
and two others, never seen in training, for every reported number (PHOTOS). All but grace_hopper
ship in scikit-image's wheel, an optional dependency of this driver only (pip install scikit-image).
The noise is the DDPM forward process of the paper's image runs (linear betas over 1000 steps,
images in [-1, 1]): training at step t = 99 (the DiT: t in 1..99), the report at t = 99 (in
distribution), 199 and 299 (out of distribution). Training ends with a report in out_dir (also
what --compare writes, for several checkpoints): psnr.md, PSNR against forward passes of every
model at every noise level; psnr.png, the same as a plot; grid.png, a few denoised validation
crops; energy.png (an EBT's), the mean energy along the thinking steps.
"""
import cli  # first: a Ctrl-C while torch loads exits quietly
import math
import os
import urllib.request
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import ebt
from ebt import UsageError
import rundir
import plots
import image_models
import compiled

REPORT_CROPS = 128  # validation crops behind every number in the report
GRID_CROPS = 4      # rows of grid.png: the report crops with the most detail (pixel std)
DIT_PASSES = (1, 3, 10, 30, 100)
DEFAULTS = dict(patch_size=4, n_layer=3, n_head=4, n_embd=96, step_size=1000.0, step_size_lr_mult=None,
                max_steps=800, batch_size=32, lr=1e-3, warmup_steps=50, eval_interval=200, eval_batches=4,
                log_interval=50)
IMAGE_RECIPES = {  # the image EBT: S1 as the paper's image runs (one step); S2 with the text S2's structure
    "s1": dict(think_steps=1, landscapes=1, random_steps=0, random_step_size=1.0, truncate=False, detach=True),
    "s2": dict(think_steps=2, landscapes=1, random_steps=1, random_step_size=2.0, truncate=True, detach=False),
}
MODEL_FLAGS = ("image_size", "patch_size", "n_layer", "n_head", "n_embd", "noise_t")
TRAIN_FLAGS = ("max_steps", "batch_size", "lr", "warmup_steps", "weight_decay", "grad_clip", "eval_interval",
               "eval_batches", "log_interval", "seed")
IMAGE_THINKING_FLAGS = tuple(k for k in cli.THINKING_FLAGS if k not in ("init_std", "replay_size", "replay_batch"))
CACHE_DIR = Path(os.environ.get("NANOEBT_CACHE", Path.home() / ".cache" / "nanoebt"))


# -----------------------------------------------------------------------------
# The baselines, on the EBT's transformer (image_models.PatchTransformer) and at its size

def timestep_embedding(t, dim):
    """Sinusoidal embedding (B, dim) of DDPM steps t (B,)."""
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def unpatchify(x, p, C):
    """(B, N, C*p*p) -> (B, C, H, W) for a square grid of N patches."""
    B, N, _ = x.shape
    n = math.isqrt(N)
    return x.reshape(B, n, n, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, n * p, n * p)


class ImageDiT(nn.Module):
    """The paper's image baseline, a Diffusion Transformer: conditioned on the DDPM step t through
    adaLN-Zero, it predicts the noise; trained on t in 1..noise_t; denoises with DDIM."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.body = image_models.PatchTransformer(cfg)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.n_embd, cfg.n_embd), nn.SiLU(), nn.Linear(cfg.n_embd, cfg.n_embd))
        self.out = nn.Linear(cfg.n_embd, cfg.channels * cfg.patch_size ** 2, bias=False)
        self.out.zero_init = True
        self.apply(ebt.init_weights)

    def predicted_noise(self, x, t):
        """x: (B, C, S, S) at DDPM steps t (B,). Returns the noise in x, (B, C, S, S)."""
        cond = self.time_mlp(timestep_embedding(t, self.config.n_embd))
        return unpatchify(self.out(self.body(x, cond)), self.config.patch_size, self.config.channels)

    def forward(self, clean, noise):
        t = torch.randint(1, self.config.noise_t + 1, (len(clean),), device=clean.device)
        loss = F.mse_loss(self.predicted_noise(image_models.ddpm_noise(clean, t, noise), t), noise)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def denoise(self, noisy, t, passes):
        """Deterministic DDIM from step t down to 0 in `passes` evaluations of the model."""
        times = torch.linspace(t, 0, passes + 1).round().long().tolist()
        x = noisy
        for now, later in zip(times, times[1:]):
            a_now, a_later = image_models.signal_variance(now).item(), image_models.signal_variance(later).item()
            noise = self.predicted_noise(x, torch.full((len(x),), now, device=x.device))
            clean = (x - (1 - a_now) ** 0.5 * noise) / a_now ** 0.5
            x = a_later ** 0.5 * clean + (1 - a_later) ** 0.5 * noise
        return x


class ImageRegressor(nn.Module):
    """The same transformer trained to output the clean image in one forward pass. With nothing to
    condition on, its conditioning vector is a zero buffer, so the blocks' shift, scale and gate are
    learned constants (the adaLN biases). The simplest, and at this size strong, baseline."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.body = image_models.PatchTransformer(cfg)
        self.register_buffer("cond", torch.zeros(cfg.n_embd))
        self.out = nn.Linear(cfg.n_embd, cfg.channels * cfg.patch_size ** 2, bias=False)
        self.out.zero_init = True  # predicts a correction to its input: it starts as the identity
        self.apply(ebt.init_weights)

    def denoise(self, noisy):
        patches = self.out(self.body(noisy, self.cond.expand(len(noisy), -1)))  # (B, N, C*p*p)
        return noisy + unpatchify(patches, self.config.patch_size, self.config.channels)

    def forward(self, clean, noise):
        pred = self.denoise(image_models.ddpm_noise(clean, self.config.noise_t, noise))
        loss = F.smooth_l1_loss(pred, clean)
        return loss, {"loss": loss.detach(), "psnr": image_models.psnr(pred.detach(), clean).mean()}


ebt.MODELS.update(image_dit=ImageDiT, image_regressor=ImageRegressor)


# -----------------------------------------------------------------------------
# Flags

def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    s = p.add_argument
    s("--model", choices=("ebt", "dit", "regressor"), help="(default: ebt)")
    s("--recipe", choices=IMAGE_RECIPES, help="the EBT's (default: s1)")
    s("--compare", nargs="+", metavar="OUT_DIR", help="report on trained checkpoints instead of training")
    s("--dataset", choices=("photos", "grace_hopper", "mnist", "cifar10"),
      help=f"photos: train on {', '.join(PHOTOS['train'])}, test on {', '.join(PHOTOS['test'])} (needs "
      "scikit-image); grace_hopper: matplotlib's one photograph, bottom fifth held out (default: photos)")
    s("--data", help="a folder of PNG/JPEG images instead (bottom fifth of each held out)")
    cli.add_flags(p, ebt.ModelConfig, MODEL_FLAGS, {**DEFAULTS, "image_size": "28 for mnist, else 32"})
    cli.add_flags(p, ebt.TrainConfig, TRAIN_FLAGS, DEFAULTS)
    g = p.add_argument_group("thinking (EBT)")
    cli.add_flags(g, ebt.ModelConfig, IMAGE_THINKING_FLAGS, {
        **DEFAULTS, "step_size_lr_mult": "3 x step_size",
        **{k: f"from --recipe: s1 {IMAGE_RECIPES['s1'][k]}, s2 {IMAGE_RECIPES['s2'][k]}" for k in IMAGE_RECIPES["s1"]}})
    cli.add_flags(g, ebt.TrainConfig, ("eval_steps",))
    g.add_argument("--report_steps", type=int, help=f"thinking steps in the report (default: {ebt.THINK_LONGER}x the trained steps)")
    s("--eval_t", type=int, nargs="+", help="report noise levels, DDPM steps (default: k (noise_t + 1) - 1 for "
      "k = 1, 2, 3 up to 1000: 99 199 299)")
    s("--passes", type=int, nargs="+", default=list(DIT_PASSES), help="the DiT's DDIM passes in the report "
      "(default: %(default)s)")
    s("--out_dir", help="checkpoint, metrics and report (default: out-image-MODEL, or out-image-compare)")
    s("--resume", action="store_true", help="continue from out_dir/ckpt.pt with its settings; training flags "
      "given override them, model and data flags must agree")
    cli.add_device_flag(p)
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or ("out-image-compare" if args.compare else f"out-image-{args.model or 'ebt'}")
    args.model = args.model and f"image_{args.model}"  # the config's kind
    rundir.check_out_dir(args.out_dir)
    if args.data and args.dataset:
        raise UsageError(f"--data {args.data} and --dataset {args.dataset}: give one (--data is a folder of images)")
    # eval_t: a DDPM step; passes: DDIM from step t takes at most t
    cli.check_flags({"report_steps": args.report_steps, "eval_t": args.eval_t, "passes": args.passes},
                    {"report_steps": (int, 1, 1000), "eval_t": (int, 1, ebt.DDPM_STEPS), "passes": (int, 1, ebt.DDPM_STEPS)})
    return args


# -----------------------------------------------------------------------------
# Image data

# Image data: images are (C, H, W) tensors, float in [0, 1] or uint8 (the downloaded datasets,
# four times smaller in memory); batches are in [-1, 1].

class ImageData:
    """Random square crops: batch -> (clean crops in [-1, 1], Gaussian noise of the same shape);
    each model noises the crops itself (the EBT and the regressor at t = noise_t, the DiT at a
    random t up to it)."""

    def __init__(self, train, val, crop, source="images", about=""):
        """train, val: sequences of (C, H, W) images (a list, or one (N, C, H, W) tensor). about: what the
        images are, for the report."""
        for split, images in (("train", train), ("val", val)):
            if len(images) == 0:
                raise UsageError(f"{source}: no {split} images")
            if min(min(img.shape[-2:]) for img in images) < crop:
                raise UsageError(f"{source}: some {split} images are smaller than the {crop}x{crop} crop; "
                                     "use a smaller --image_size")
        self.split = {"train": train, "val": val}
        self.crop, self.channels, self.about = crop, train[0].shape[0], about
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
        raise UsageError(f"{path} is not a readable PNG or JPEG image ({type(e).__name__})") from None
    a = torch.from_numpy(a.copy())
    a = a.float() if a.is_floating_point() else a.float() / 255  # PNG reads as float, JPEG as uint8
    a = a[..., None] if a.dim() == 2 else a                       # (H, W, channels)
    a = a[..., :1].expand(-1, -1, 3) if a.shape[-1] <= 2 else a[..., :3]  # gray to RGB, drop alpha
    return a.permute(2, 0, 1).contiguous()


def image_folder(path):
    """Every PNG or JPEG file in a folder, as (name, (3, H, W) image) pairs."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"--data {path} " + ("is a file; pass a folder of images" if path.exists() else "does not exist"))
    files = sorted(f for f in path.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise UsageError(f"image folder {path} has no PNG or JPEG files")
    return [(f.name, read_image(f)) for f in files]


# Colour photographs that ship with matplotlib (grace_hopper) and in scikit-image's wheel (skimage.data, no
# download), whole, in two disjoint sets: the test photographs are never seen in training, and show what
# none of the training ones does (an animal's fur, a close-up cup). Left out: motorcycle_left's stereo twin,
# the grey photographs, and hubble_deep_field, retina, immunohistochemistry (scientific, mostly flat background).
PHOTOS = {"train": ("astronaut", "grace_hopper", "motorcycle_left", "rocket"), "test": ("chelsea", "coffee")}


def photograph(name):
    """One of PHOTOS as a (3, H, W) float tensor in [0, 1]."""
    if name == "grace_hopper":
        import matplotlib.cbook
        return read_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg"))
    try:
        import skimage.data  # optional: only these photographs need it
    except ImportError:
        raise UsageError("--dataset photos (the default) reads photographs that ship with scikit-image: "
                         "pip install scikit-image; or use --dataset grace_hopper or --data DIR") from None
    a = skimage.data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skimage.data, name)()
    return torch.from_numpy(a).permute(2, 0, 1).float() / 255  # (H, W, 3) uint8


def held_out_strips(named_images, crop):
    """Hold out the bottom fifth (at least one crop high) of every image for validation.
    Returns lists of train and val images."""
    train, val = [], []
    for name, img in named_images:
        H, W = img.shape[-2:]
        n_val = max(crop, H // 5)
        if H - n_val < crop or W < crop:
            raise UsageError(f"{name} is {H}x{W} pixels: too small for {crop}x{crop} crops plus a held-out "
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
        raise UsageError(f"could not download {url} ({e}); {hint}") from None
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
        raise UsageError(f"{path} is not a gzipped uint8 IDX file")
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
        raise UsageError(f"{path} is not the CIFAR-10 python tarball (no data_batch_* / test_batch)")
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
            raise UsageError(f"{path} is corrupt or truncated ({type(e).__name__}); delete it to download it "
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


def data_spec(ckpt):
    """What data a checkpoint was trained on: dataset (photos, grace_hopper, mnist, cifar10 or folder), data
    (the folder), photos (the photos' split, as trained), image_size."""
    started = ckpt.get("image_data") or ckpt["started"]
    spec = {"dataset": started["dataset"], "data": started["data"], "photos": started.get("photos"),
            "image_size": ckpt["model_config"]["image_size"]}
    if spec["dataset"] == "photos" and not spec["photos"]:  # a run from before the split: "photos" was grace_hopper
        spec["dataset"] = "grace_hopper"
    return spec


def load_data(spec):
    """ImageData from a data spec (data_spec); its `about` says what it trains and tests on."""
    dataset, crop = spec["dataset"], spec["image_size"]
    if dataset in ("mnist", "cifar10"):
        train, val = download_dataset(dataset)
        source, about = dataset, f"{dataset}: trained on its training set, tested on its test set"
    elif dataset == "photos":  # the split the run was trained on, as its checkpoint records it
        train, val = ([photograph(name) for name in spec["photos"][split]] for split in ("train", "test"))
        source = "the photographs"
        about = (f"trained on the photographs {', '.join(spec['photos']['train'])}; tested on others, never seen "
                 f"in training: {', '.join(spec['photos']['test'])}")
    else:  # one set of images: the bottom fifth of each held out
        named = image_folder(spec["data"]) if dataset == "folder" else [("grace_hopper", photograph("grace_hopper"))]
        train, val = held_out_strips(named, crop)
        source = spec["data"] or "grace_hopper"
        about = (f"trained on {', '.join(name for name, _ in named)} without the bottom fifth of each; tested on "
                 "those bottom fifths")
    return ImageData(train, val, crop, source=source, about=about)


# -----------------------------------------------------------------------------
# Training and the report

def train_models(args, device):
    device = rundir.join_process_group(device)[2]  # under torchrun the ranks own out_dir as one
    with rundir.owned(args.out_dir):  # a second run into out_dir refuses while this one runs
        rundir.prepare_out_dir(args.out_dir, args.resume)
        ckpt = rundir.load_checkpoint(Path(args.out_dir) / "ckpt.pt", needs=rundir.RESUMABLE) if args.resume else None
        if ckpt and ckpt["model_config"]["model"] not in ebt.IMAGE_KINDS:
            raise UsageError(f"{args.out_dir}/ckpt.pt holds a {ckpt['model_config']['model']!r} model; resume it with "
                             "train_text.py")
        kind = ckpt["model_config"]["model"] if ckpt else args.model or "image_ebt"
        cli.refuse_thinking(args, kind, IMAGE_THINKING_FLAGS + ("eval_steps", "recipe"))
        dataset = "folder" if args.data else args.dataset or "photos"
        started = {**ckpt.get("started", {}), **data_spec(ckpt)} if ckpt else {  # data_spec reads older checkpoints
            "recipe": args.recipe or "s1" if kind in ebt.EBT_KINDS else None, "dataset": dataset, "data": args.data,
            "photos": PHOTOS if dataset == "photos" else None}
        layers = [DEFAULTS, IMAGE_RECIPES[started["recipe"]] if kind in ebt.EBT_KINDS else {},
                  {"model": kind, "channels": 1 if dataset == "mnist" else 3, "image_size": 28 if dataset == "mnist" else 32}]
        derive = lambda values: values.update(step_size_lr_mult=values["step_size_lr_mult"] or 3 * values["step_size"])
        cfg, tc = cli.configs(args, layers, ckpt, derive)
        tc.out_dir, tc.device = args.out_dir, device
        data = load_data({**started, "image_size": cfg.image_size})
        model = ebt.build_model(cfg, tc.seed)
        if tc.compile:
            compiled.compile_model(model)
        ebt.train(model, data, tc, rundir.Run(tc.out_dir, {"started": started}, resume=bool(ckpt)))
    return {Path(args.out_dir).name: model.eval()}, data


def load_trained(dirs, device):
    """The image models in dirs (named by their directories), and the data they were trained on."""
    models, spec = {}, None
    for d in dirs:
        ckpt = rundir.load_checkpoint(Path(d) / "ckpt.pt", device)
        if ckpt["model_config"]["model"] not in ebt.IMAGE_KINDS:
            raise UsageError(f"{d}/ckpt.pt is not an image model checkpoint")
        if spec and data_spec(ckpt) != spec:
            raise UsageError(f"{d} was trained on other data than {dirs[0]} ({data_spec(ckpt)} vs {spec})")
        spec, name = data_spec(ckpt), Path(d).resolve().name
        if name in models:
            raise UsageError(f"two --compare directories are named {name}; the report names models by "
                             "their directory, so give them different names")
        models[name] = rundir.load_model(ckpt, device)
    return models, load_data(spec)


def denoise_all(models, noisy, t, passes, steps):
    """Every model's denoising of one batch noised to step t: {(name, forward passes): images}, and
    each EBT's mean energy along its steps (on each step's landscape)."""
    out, energies = {("noisy input", 0): noisy}, {}
    for name, model in models.items():
        if isinstance(model, ImageRegressor):
            with torch.no_grad():
                out[name, 1] = model.denoise(noisy)
        elif isinstance(model, ImageDiT):
            out.update({(name, p): model.denoise(noisy, t, p) for p in passes})
        else:
            traj = model.descend(model.energy, noisy, steps or ebt.THINK_LONGER * model.trained_steps())
            out.update({(name, k): y for k, y in enumerate(traj.ys[1:], 1)})
            energies[name] = [e.mean().item() for e in traj.energies]
    return out, energies


def report(models, data, args, device):
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trained_t = next(iter(models.values())).config.noise_t
    levels = args.eval_t or [t for t in (k * (trained_t + 1) - 1 for k in (1, 2, 3)) if t <= ebt.DDPM_STEPS]
    g = torch.Generator().manual_seed((ebt.TrainConfig.seed if args.seed is None else args.seed) + 2)
    clean, _ = data.batch("val", REPORT_CROPS, generator=g)
    clean = clean.to(device)
    detailed = clean.flatten(1).std(1).topk(GRID_CROPS).indices
    table, curves, grid = {}, {}, None
    for t in levels:
        noisy = image_models.ddpm_noise(clean, t, torch.randn(clean.shape, generator=g).to(device))
        preds, curves[t] = denoise_all(models, noisy, t, args.passes, args.report_steps)
        for key, y in preds.items():
            table.setdefault(key, {})[t] = image_models.psnr(y, clean).mean().item()
        if grid is None:  # the first level is the training level; an EBT as trained, a DiT at up to 10 passes
            shown = {name: model.trained_steps() if isinstance(model, ebt.Thinker) else 10 for name, model in models.items()}
            grid = {name: preds[name, max((p for (n, p) in preds if n == name and p <= shown.get(name, 0)),
                                          default=min(p for (n, p) in preds if n == name))][detailed]
                    for name, _ in preds} | {"clean": clean[detailed]}
    seen = lambda t: "trained" if t == trained_t else "unseen"
    lines = ["| model | forward passes | " + " | ".join(f"t = {t} ({seen(t)})" for t in levels) + " |",
             "|---|---|" + "---|" * len(levels)]
    lines += [f"| {name} | {p} | " + " | ".join(f"{row[t]:.2f}" for t in levels) + " |"
              for (name, p), row in table.items()]
    text = (f"Data: {data.about}.\n\n"
            f"PSNR (dB, images in [-1, 1]) on {REPORT_CROPS} held-out {data.crop}x{data.crop} crops, DDPM noise at step "
            "t; an EBT's forward passes are its thinking steps (each also a backward pass), a DiT's its DDIM "
            "steps.\n\n" + "\n".join(lines) + "\n")
    rundir.write_atomically(out / "psnr.md", lambda tmp: tmp.write_text(text))
    print(text)
    plot_grid(grid, out / "grid.png")
    plot_psnr(table, levels, trained_t, out / "psnr.png")
    written = [out / "psnr.md", out / "psnr.png", out / "grid.png"]
    if any(curves.values()):
        plot_energy(curves, trained_t, out / "energy.png")
        written.append(out / "energy.png")
    print("wrote " + ", ".join(map(str, written)))


def short(name):
    """A model's name in the plots: its directory's, without the out-/image- prefixes every run shares."""
    return name.removeprefix("out-").removeprefix("image-")


def plot_grid(columns, path):
    """One row per crop: noisy, each model's denoising (an EBT after its trained steps, the DiT at
    its most passes up to 10), clean."""
    fig = plots.figure(figsize=(1.2 * len(columns), 1.2 * GRID_CROPS + 0.4))
    axes = fig.subplots(GRID_CROPS, len(columns), squeeze=False)
    for c, (name, images) in enumerate(columns.items()):
        axes[0, c].set_title(short(name), fontsize=9)
        for r in range(GRID_CROPS):
            img = ((images[r].detach().float() + 1) / 2).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            axes[r, c].imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1,
                              interpolation="nearest")
            axes[r, c].axis("off")
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=90)


def plot_psnr(table, levels, trained_t, path):
    """PSNR against forward passes, one panel per noise level, one curve per model."""
    fig = plots.figure(figsize=(3.4 * len(levels) + 1.4, 3.3), layout="constrained")
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
    fig = plots.figure(figsize=(6, 4), layout="constrained")
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


def main(argv=None):
    args = parse_args(argv)
    device = cli.pick_device(args.device)
    models, data = load_trained(args.compare, device) if args.compare else train_models(args, device)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one report
        report(models, data, args, device)


if __name__ == "__main__":
    cli.invoke(main)
