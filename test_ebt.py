"""nanoEBT tests. Run: python -m pytest -q test_ebt.py  (a few minutes on 2 CPU cores, no network)."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ebt

HERE = Path(__file__).resolve().parent
torch.set_num_threads(min(2, os.cpu_count() or 1))

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away"]


def synthetic_text(n_words=6000, seed=0):
    """Random words from a small list: characters inside a word are predictable, so a
    model that learns drops far below the unigram entropy."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(WORDS), (n_words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx) + "\n"


def unigram_entropy(text):
    counts = torch.tensor([text.count(c) for c in sorted(set(text))], dtype=torch.float64)
    p = counts / counts.sum()
    return float(-(p * p.log()).sum())


def tiny_config(**kw):
    base = dict(model="ebt", vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=32)
    base.update(kw)
    return ebt.ModelConfig(**base)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text(synthetic_text())
    return path


def run_script(*args, cwd=HERE):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


# --- Image denoising EBT (issue 4)

import contextlib
import gzip
import io
import pickle
import tarfile

import numpy as np

import train_image


def tiny_image_config(**kw):
    base = dict(model="image_ebt", channels=3, image_size=16, patch_size=4, n_layer=2, n_head=2, n_embd=64,
                step_size=100.0, step_size_lr_mult=300.0)
    base.update(kw)
    return ebt.ModelConfig(**base)


def photo_data(crop=16, noise_std=0.1):
    return ebt.ImageData(*ebt.held_out_strips(ebt.sample_photos(), crop), crop, noise_std, seed=0)


@contextlib.contextmanager
def one_thread():
    """Matrices this small: a second thread costs more than it gives, worst on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_image_ebt(tmp_path_factory):
    """A short EBT training on 16x16 crops of matplotlib's photo (about 8 s on 2 cores)."""
    torch.manual_seed(0)
    model = ebt.build_model(tiny_image_config())
    tc = ebt.TrainConfig(max_steps=200, batch_size=16, lr=2e-3, warmup_steps=20, eval_interval=200,
                         eval_batches=1, log_interval=50, out_dir=str(tmp_path_factory.mktemp("img")),
                         device="cpu", seed=0)
    with one_thread():
        ebt.train(model, photo_data(), tc, log=lambda *_: None)
    return model.eval()


def held_out_crops(n=64, noise_std=0.1):
    return photo_data(noise_std=noise_std).batch("val", n, generator=torch.Generator().manual_seed(5))


def test_image_ebt_training_beats_the_noisy_input(trained_image_ebt):
    noisy, clean = held_out_crops()
    denoised = trained_image_ebt.predict(noisy).ys[-1]
    before, after = ebt.psnr(noisy, clean).mean().item(), ebt.psnr(denoised, clean).mean().item()
    assert after > before + 2.0, (before, after)


def test_image_ebt_energy_falls_along_thinking_steps(trained_image_ebt):
    noisy, _ = held_out_crops()
    energies = [e.mean().item() for e in trained_image_ebt.predict(noisy).energies]  # steps 0..2
    assert all(a > b for a, b in zip(energies, energies[1:])), energies


def test_image_baseline_outputs_an_image_in_one_pass():
    model = ebt.build_model(tiny_image_config(model="image_baseline"))
    noisy, clean = held_out_crops(4)
    loss, metrics = model(noisy, clean)
    assert model.denoise(noisy).shape == clean.shape and {"loss", "psnr"} <= set(metrics)
    loss.backward()


def test_bidirectional_attention_explicit_matches_fused():
    attn = ebt.Attention(tiny_image_config())
    x = torch.randn(2, 16, 64)
    assert torch.allclose(attn.attend_all(x, True), attn.attend_all(x, False), atol=1e-5)
    # not causal: the first token depends on the last
    x.requires_grad_()
    (grad,) = torch.autograd.grad(attn.attend_all(x, True)[:, 0].sum(), x)
    assert grad[:, -1].abs().sum() > 0


def test_patchify_roundtrip():
    img = torch.randn(2, 3, 16, 16)
    patches = ebt.patchify(img, 4)
    assert patches.shape == (2, 16, 48)
    assert torch.equal(patches[0, 1], img[0, :, 0:4, 4:8].reshape(-1))  # row-major, second patch
    assert torch.equal(ebt.unpatchify(patches, 4, 3), img)


def test_psnr_hand_checked():
    clean = torch.zeros(2, 1, 4, 4)
    pred = torch.stack([torch.full((1, 4, 4), 0.1), torch.full((1, 4, 4), 0.5)])
    # mse 0.01 -> 10 log10(1 / 0.01) = 20 dB; mse 0.25 -> 6.0206 dB
    assert torch.allclose(ebt.psnr(pred, clean), torch.tensor([20.0, 6.0206]), atol=1e-4)
    # predictions are clipped to [0, 1] first: -0.1 counts as 0, a perfect (capped) score
    assert ebt.psnr(torch.full((1, 1, 4, 4), -0.1), clean[:1]).item() == pytest.approx(100.0)


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
    assert np.array_equal(ebt.read_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz"), train)
    monkeypatch.setattr(ebt, "CACHE_DIR", tmp_path)  # cached files: no network
    got_train, got_test = ebt.download_dataset("mnist")
    assert got_train.shape == (5, 1, 28, 28) and got_train.dtype == torch.uint8
    assert np.array_equal(got_test[:, 0].numpy(), test)


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
    train, test = ebt.read_cifar10(path)
    assert train.shape == (5, 3, 32, 32) and test.shape == (4, 3, 32, 32)
    # channel-major rows: the first 1024 values are the red plane
    assert np.array_equal(train[0, 0].reshape(-1), batches["data_batch_1"][0, :1024])
    assert np.array_equal(train[3], batches["data_batch_2"][0].reshape(3, 32, 32))


def test_train_image_driver_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = ["--image_size", "16", "--n_layer", "1", "--n_embd", "32", "--max_steps", "4", "--eval_interval", "4",
            "--eval_batches", "1", "--batch_size", "4", "--report_steps", "3", "--device", "cpu"]
    with one_thread():
        train_image.main(["--model", "ebt", *tiny])
        train_image.main(["--model", "baseline", *tiny])
        train_image.main(["--compare", "out-image-ebt", "out-image-baseline", "--report_steps", "3", "--device", "cpu"])
    table = (tmp_path / "out-image-compare" / "psnr.md").read_text()
    assert "baseline (1 pass)" in table and "ebt 3" in table and "0.3 (unseen)" in table
    for f in ("grid.png", "energy.png"):
        assert (tmp_path / "out-image-compare" / f).stat().st_size > 0


def test_train_image_bad_inputs_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOEBT_CACHE", str(tmp_path / "cache"))  # nothing cached: mnist must download
    empty, corrupt, small = (tmp_path / d for d in ("empty", "corrupt", "small"))
    for d in (empty, corrupt, small):
        d.mkdir()
    (corrupt / "broken.png").write_bytes(b"not a png")
    import matplotlib.image
    matplotlib.image.imsave(small / "tiny.png", np.zeros((20, 20, 3)))
    cases = [["--data", str(empty)], ["--data", str(corrupt)], ["--data", str(small)],
             ["--noise_std", "-1"], ["--dataset", "mnist"]]
    for args in cases:
        r = run_script("train_image.py", *args, "--max_steps", "1", "--out_dir", str(tmp_path / "out"))
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
