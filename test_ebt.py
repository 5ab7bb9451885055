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
