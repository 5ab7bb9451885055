"""
The image data train_image.py trains and reports on: photographs, a folder of images, MNIST or CIFAR-10.
Images are (C, H, W) tensors, float in [0, 1] or uint8 (the downloaded datasets, four times smaller in
memory); batches are random square crops in [-1, 1].
"""
import gzip
import os
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

import rundir
from checks import UsageError

CACHE_DIR = Path(os.environ.get("NANOEBT_CACHE", Path.home() / ".cache" / "nanoebt"))
MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class ImageData:
    """Random square crops: batch -> (clean crops in [-1, 1], Gaussian noise of the same shape); each model noises
    the crops itself (the EBT and the regressor at t = noise_t, the DiT at a random t up to it)."""

    def __init__(self, train, val, crop, source, about):
        """train, val: (C, H, W) images (a list, or one (N, C, H, W) tensor). about: what they are, for the report."""
        for split, images in (("train", train), ("val", val)):
            if len(images) == 0:
                raise UsageError(f"{source}: no {split} images")
            if min(min(img.shape[-2:]) for img in images) < crop:
                raise UsageError(f"{source}: some {split} images are smaller than the {crop}x{crop} crop; "
                                 "use a smaller --image_size")
        self.split = {"train": train, "val": val}
        self.crop, self.about = crop, about
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


# Colour photographs, none downloaded, in two disjoint sets: why these, assets/images.md ("The data")
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
    """Lists of train and val images: the bottom fifth (at least one crop high) of every image held out."""
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


def download(url, path):
    """Fetch url into path (a Path) once (atomically); later calls reuse the cached file."""
    if path.exists():
        return path
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except OSError as e:
        raise UsageError(f"could not download {url} ({e}); no network? put the file at {path}, or use the default "
                         "photos or --data DIR") from None
    rundir.write_atomically(path, lambda tmp: tmp.write_bytes(data))
    return path


def read_idx(path):
    """A gzipped IDX file (the MNIST format): big-endian magic (0, 0, dtype code, ndim),
    ndim big-endian int32 sizes, then the raw uint8 array."""
    data = gzip.decompress(path.read_bytes())
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise UsageError(f"{path} is not a gzipped uint8 IDX file")
    ndim = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_cifar10(path):
    """CIFAR-10's python tarball (five pickled training batches and one test batch, each a dict whose b"data" is
    (10000, 3072) uint8, channel-major 32x32 images) as (train, test) uint8 arrays (N, 3, 32, 32)."""
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
    def read(reader, path):  # a cached file cut short (or not the dataset) is named, not traced back
        try:
            return reader(path)
        except (OSError, EOFError, ValueError, tarfile.TarError, pickle.UnpicklingError) as e:
            raise UsageError(f"{path} is corrupt or truncated ({type(e).__name__}); delete it to download it "
                             "again") from None
    if name == "mnist":
        files = ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")
        paths = [download(MNIST_URL + f, CACHE_DIR / "mnist" / f) for f in files]
        return tuple(torch.from_numpy(read(read_idx, path).copy())[:, None] for path in paths)  # (N, 1, 28, 28)
    path = download(CIFAR10_URL, CACHE_DIR / "cifar-10-python.tar.gz")
    return tuple(torch.from_numpy(split) for split in read(read_cifar10, path))


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
