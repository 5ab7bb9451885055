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


# --- Thinking at inference (issue 3)

def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return ebt.build_model(tiny_config(**kw)).double().eval()


@pytest.mark.parametrize("kind", ["ebt", "transformer"])
def test_cached_generation_matches_full_recompute(kind):
    """Same seed, same tokens, and the same logits at every position, also after the window
    has crossed block_size (16) and the cache was re-filled twice."""
    model = tiny_model(model=kind)
    prompt = torch.randint(13, (2, 5), generator=torch.Generator().manual_seed(1))
    thinking = {"candidates": 2, "steps": 3} if kind == "ebt" else {}
    run = lambda use_cache: ebt.generate(model, prompt, 22, generator=torch.Generator().manual_seed(2),
                                         use_cache=use_cache, **thinking)
    cached, full = run(True), run(False)
    assert cached.idx.shape == (2, 27)  # windows re-filled at lengths 17 and 25
    assert torch.equal(cached.idx, full.idx)
    torch.testing.assert_close(cached.logits, full.logits, rtol=0, atol=1e-9)
    if kind == "ebt":
        torch.testing.assert_close(cached.energy, full.energy, rtol=0, atol=1e-9)


def test_transformer_generation_logits_are_the_last_position_of_a_full_pass():
    model = tiny_model(model="transformer")
    prompt = torch.randint(13, (1, 4), generator=torch.Generator().manual_seed(1))
    out = ebt.generate(model, prompt, 10, temperature=0)
    for t in range(10):
        expected = model.logits(out.idx[:, :4 + t])[0][:, -1]
        torch.testing.assert_close(out.logits[:, t], expected, rtol=0, atol=1e-9)
    with pytest.raises(ebt.UsageError, match="needs an EBT"):
        ebt.generate(model, prompt, 1, candidates=2)


def test_self_verification_keeps_the_lowest_final_energy():
    model = tiny_model()
    prompt = torch.randint(13, (3, 4), generator=torch.Generator().manual_seed(1))
    out = ebt.generate(model, prompt, 6, generator=torch.Generator().manual_seed(2), candidates=5, steps=3)
    assert out.candidate_energy.shape == (3, 6, 5)
    spread = out.candidate_energy.max(-1).values - out.candidate_energy.min(-1).values
    assert (spread > 1e-6).all()  # the candidates really differ, so the choice matters
    for t in range(6):  # the kept logits, scored again from scratch, are the lowest of all candidates
        energy = model.energy(out.logits[:, t:t + 1], model.context(out.idx[:, :4 + t]), 3)[:, 0]
        torch.testing.assert_close(energy, out.energy[:, t], rtol=0, atol=1e-9)
        assert (energy[:, None] <= out.candidate_energy[:, t] + 1e-12).all()


def test_adaptive_stopping_spends_fewer_steps_on_a_converged_position():
    model = tiny_model()
    context = model.context(torch.randint(13, (1, 2), generator=torch.Generator().manual_seed(1)))
    y0 = model.initial_logits(1, 2, "cpu", torch.Generator().manual_seed(2))
    converged = model.predict(None, 60, y0=y0, context=context).ys[-1]
    start = torch.stack([converged[0, 0], y0[0, 1]])[None]  # position 0 converged, position 1 fresh
    traj = model.predict(None, 20, y0=start, context=context, tolerance=1e-6)
    assert traj.steps_used[0, 0] == 1 and traj.steps_used[0, 1] > 2
    both_converged = torch.cat([converged[:, :1], converged[:, :1]], 1)
    traj = model.predict(None, 20, y0=both_converged, context=context, tolerance=1e-6)
    assert len(traj.ys) == 2 and len(traj.energies) == 2  # thinking ended once every position had settled
    out = ebt.generate(model, start.new_zeros(1, 3, dtype=torch.long), 4, steps=20, tolerance=1e-6)
    assert ((1 <= out.steps_used) & (out.steps_used <= 20)).all()
    assert [len(t[0]) for t in out.trajectory] == (out.steps_used[0] + 1).tolist()


@pytest.mark.parametrize("plot, numbers_shape", [
    (ebt.plot_energy_per_step, (10, 4)), (ebt.plot_energy_heatmap, (10, 4)),
    (ebt.plot_energy_landscape, (9, 9)), (ebt.plot_distribution_sharpening, (4, 17))])
def test_plot_functions_return_a_figure_and_write_a_png(plot, numbers_shape, tmp_path):
    tokenizer = ebt.CharTokenizer.fit(synthetic_text())
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    extra = {"grid": 9} if plot is ebt.plot_energy_landscape else {}
    fig, numbers = plot(model, tokenizer, "the cat sat", steps=3, **extra)
    main = fig.axes[0]
    assert main.get_xlabel() and main.get_title()
    assert len(fig.axes) == (1 if plot is ebt.plot_energy_per_step else 2)  # plot (+ colour bar)
    assert tuple(numbers.shape) == numbers_shape and torch.isfinite(numbers).all()
    fig.savefig(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "plot.png").stat().st_size > 1000


def test_thinking_curves_table_and_plot(tmp_path):
    tokenizer = ebt.CharTokenizer.fit(synthetic_text())
    ids = torch.tensor(tokenizer.encode(synthetic_text(300)))
    results = {}
    for kind in ("ebt", "transformer"):
        model = tiny_model(model=kind, vocab_size=tokenizer.vocab_size)
        results[kind] = ebt.thinking_curves(model, ids, steps=(1, 2, 4), candidates=(1, 2), windows=2)
    assert list(results["ebt"]["steps"]) == [1, 2, 4] and list(results["ebt"]["candidates"]) == [1, 2]
    assert len(set(results["transformer"]["steps"].values())) == 1  # the baseline does not think: flat
    assert all(1 < p < math.inf for r in results.values() for p in r["steps"].values())
    table = ebt.thinking_table(results, trained_steps=2)
    assert "<- trained" in table and "candidates (2 steps)" in table
    fig = ebt.plot_thinking_curves(results, trained_steps=2)
    assert [ax.get_ylabel() for ax in fig.axes] == ["perplexity", "perplexity"]
    fig.savefig(tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_ood_text_is_filtered_to_the_vocabulary():
    tokenizer = ebt.CharTokenizer.fit(synthetic_text())
    text, dropped = ebt.in_vocabulary(ebt.pydoc_topics_text()[:2000], tokenizer)
    assert dropped > 0 and len(text) + dropped == 2000
    tokenizer.encode(text)  # no error: every remaining character is known


@pytest.fixture
def sample_checkpoints(tmp_path):
    """A tiny untrained EBT and Transformer saved as text checkpoints, plus a corrupt file."""
    tokenizer = ebt.CharTokenizer.fit(synthetic_text())
    paths = {}
    for kind in ("ebt", "transformer"):
        cfg = tiny_config(model=kind, vocab_size=tokenizer.vocab_size)
        paths[kind] = tmp_path / f"{kind}.pt"
        ebt.save_checkpoint(paths[kind], {"model": ebt.build_model(cfg).state_dict(), "model_config": ebt.asdict(cfg),
                                          "tokenizer": tokenizer.state()})
    paths["corrupt"] = tmp_path / "corrupt.pt"
    paths["corrupt"].write_bytes(b"not a checkpoint at all")
    paths["missing"] = tmp_path / "missing.pt"
    return paths


def test_sample_generates_and_saves_plots(sample_checkpoints, tmp_path):
    r = run_script("sample.py", "--ckpt", str(sample_checkpoints["ebt"]), "--prompt", "the cat", "--num_tokens", "12",
                   "--steps", "3", "--candidates", "2", "--tolerance", "1e-4", "--top_k", "5", "--device", "cpu",
                   "--plots", str(tmp_path / "plots"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the cat") and len(r.stdout.rstrip("\n")) >= len("the cat") + 12
    assert "steps used" in r.stderr
    for name in ("energy_per_step", "energy_heatmap", "energy_landscape", "distribution_sharpening"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000


@pytest.mark.parametrize("ckpt, extra, message", [
    ("missing", [], "does not exist"),
    ("corrupt", [], "unreadable or corrupt"),
    ("ebt", ["--prompt", "the DOG!"], "'!DGO'"),
    ("transformer", ["--plots", "plots"], "needs an EBT"),
    ("transformer", ["--candidates", "4"], "needs an EBT"),
])
def test_sample_bad_input_is_one_line_exit_2(sample_checkpoints, ckpt, extra, message):
    r = run_script("sample.py", "--ckpt", str(sample_checkpoints[ckpt]), "--num_tokens", "3", "--device", "cpu", *extra)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error:") and message in r.stderr
