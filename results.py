"""
Re-create the README's "Results": the EBT paper's claims tested at small scale, on
character-level Tiny Shakespeare (the CPU preset of train_text.py) and on the photo
matplotlib ships (the defaults of train_image.py).

    python results.py --data tinyshakespeare.txt   # train what is missing in out-results/, then report
    python results.py --seeds 1337                 # one seed instead of two

Every run is an ordinary train_text.py or train_image.py command, printed before it starts,
so runs can also be launched by hand (in parallel) into the same directories; an interrupted
run is resumed. From scratch, everything takes about 2 hours on 2 CPU cores; the report from
existing checkpoints about 12 minutes.

Writes to out-results/: results.md (every table), results.json (every number, per seed),
thinking_steps.png, candidates.png, thinking_ood.png, ablation.png, and image/ (the image report:
psnr.md, psnr.png, grid.png, energy.png).
"""
import argparse
import json
import math
from pathlib import Path

import torch

import ebt
import train_image
import train_text

TRAINED_STEPS = 2                          # the text EBTs' think_steps (train_text.py's default)
STEPS = (1, 2, 3, 4, 6, 8, 12, 16)         # thinking steps evaluated, up to 8x the trained number
CANDIDATES = (1, 2, 4, 8, 16)              # self-verification, at the trained number of steps
MORE_STEPS, VERIFY = 4 * TRAINED_STEPS, 8  # thinking_changes compares these with 2 steps, 1 candidate

# The System 2 training options (the paper's), on top of S1 (below):
# name -> (short name for directories, train_text.py flags).
SYSTEM2 = {"Langevin noise": ("langevin", ["--langevin_std", "0.2"]),
           "random step size": ("random-step-size", ["--random_step_size", "2"]),
           "random steps": ("random-steps", ["--random_steps", "2"])}
# S1: train_text.py's recipe before the start-noise sweep of README "The default recipe" (training
# starts of std U[0, 0.5], thinking from std 0.5), which these results were measured with.
S1 = ["--train_init_std", "0.5", "--init_std", "0.5"]
TEXT_RUNS = {  # label -> (directory prefix, train_text.py flags on top of --preset cpu)
    "Transformer++": ("transformer", ["--model", "transformer"]),
    "S1": ("s1", S1),
    "S2": ("s2", S1 + sum((flags for _, flags in SYSTEM2.values()), [])),
}
ABLATION = {f"S2 without {option}": (f"s2-no-{short}", S1 + sum((f for o, (_, f) in SYSTEM2.items() if o != option), []))
            for option, (short, _) in SYSTEM2.items()}
# The S1 models also think from a zero start (uniform logits): their best one-step prediction.
ZERO_START = "S1, zero start"
IMAGE_RUNS = {"ebt": ["--model", "ebt"], "baseline": ["--model", "baseline"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_argument
    s("--data", help="the training text (default: Tiny Shakespeare, downloaded once and cached)")
    s("--seeds", type=int, nargs="+", default=[1337, 1338],
      help="seeds of the S1 / S2 / Transformer++ runs; the ablation and images use the first (default: %(default)s)")
    s("--out_dir", default="out-results", help="(default: %(default)s)")
    s("--windows", type=int, default=64, help="evaluation windows of block_size tokens per text (default: %(default)s)")
    s("--device", default="auto", help="auto, cpu, cuda or mps (default: %(default)s)")
    s("--preset", default="cpu", choices=train_text.PRESETS, help="train_text.py preset (default: %(default)s)")
    return p.parse_args(argv)


def ensure_trained(script, argv, out_dir):
    """Train (or finish training) the run in out_dir unless its checkpoint is complete."""
    path = Path(out_dir) / "ckpt.pt"
    if path.exists():
        ckpt = ebt.load_checkpoint(path)
        if ckpt["step"] >= ckpt["train_config"]["max_steps"]:
            return
        argv = argv + ["--resume"]
    print(f"$ python {script.__name__}.py {' '.join(argv)}", flush=True)
    script.main(argv)
    ckpt = ebt.load_checkpoint(path)
    if ckpt["step"] < ckpt["train_config"]["max_steps"]:  # Ctrl-C: train() saved and returned
        raise ebt.UsageError(f"training of {out_dir} stopped at step {ckpt['step']}; run results.py again to resume")


def text_curves(path, data_text, windows, device, **overrides):
    """Cross-entropy (nats per token) against thinking steps and candidates, on the validation
    split and on the OOD text: {"val" | "ood": {"steps" | "candidates": {k: CE}}}.
    overrides: config fields, e.g. init_std (the start of thinking)."""
    model, tokenizer = ebt.text_model_from_checkpoint(path, device, **overrides)
    val, ood, _ = ebt.validation_and_ood(tokenizer, model.config.block_size, data_text)
    curves = {}
    for split, ids in (("val", val), ("ood", ood)):
        ppl = ebt.thinking_curves(model, ids, STEPS, CANDIDATES, windows=windows, seed=0)
        curves[split] = {kind: {k: math.log(p) for k, p in c.items()} for kind, c in ppl.items()}
    return curves


def mean(values):
    return sum(values) / len(values)


def change(before, after):
    """Relative change of cross-entropy, in percent: negative means thinking helped."""
    return 100 * (after / before - 1)


def thinking_changes(c):
    """What thinking does to one model's CE on one split: more steps (one candidate), and
    best of several candidates against one (both at the trained number of steps; the two
    curves think from different random starts)."""
    return {"steps": change(c["steps"][TRAINED_STEPS], c["steps"][MORE_STEPS]),
            "verify": change(c["candidates"][1], c["candidates"][VERIFY])}


# Tables (markdown) -----------------------------------------------------------

def curve_table(results, kind, keys, key_name):
    """Mean over seeds of each model's CE, val and OOD side by side."""
    head = [f"{label} {split}" for split in ("val", "OOD") for label in results]
    lines = [f"| {key_name} | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for k in keys:
        row = [mean([r[split][kind][k] for r in runs.values()]) for split in ("val", "ood") for runs in results.values()]
        mark = " (trained)" if kind == "steps" and k == TRAINED_STEPS else ""
        lines.append(f"| {k}{mark} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)


def change_table(results):
    lines = [f"| model | text | CE, {TRAINED_STEPS} steps | change with {MORE_STEPS} steps | change with best of {VERIFY} |",
             "|---|---|---|---|---|"]
    for label, runs in results.items():
        if label == "Transformer++":
            continue
        for split, name in (("val", "validation"), ("ood", "OOD")):
            per_seed = [thinking_changes(r[split]) for r in runs.values()]
            ce = " / ".join(f"{r[split]['steps'][TRAINED_STEPS]:.3f}" for r in runs.values())
            cells = [" / ".join(f"{g[kind]:+.1f}%" for g in per_seed) for kind in ("steps", "verify")]
            lines.append(f"| {label} | {name} | {ce} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(ablation):
    columns = [("val", "steps", k) for k in (1, 2, 4, 8, 16)] + [("val", "candidates", VERIFY)] + [
        ("ood", "steps", k) for k in (TRAINED_STEPS, MORE_STEPS)]
    names = [f"{'val' if split == 'val' else 'OOD'} {f'best of {k}' if kind == 'candidates' else f'{k} steps'}"
             for split, kind, k in columns]
    lines = ["| variant | " + " | ".join(names) + f" | change {MORE_STEPS} steps val; OOD | change best of {VERIFY} val; OOD |",
             "|---" * (len(names) + 3) + "|"]
    for label, runs in ablation.items():
        row = [mean([r[split][kind][k] for r in runs.values()]) for split, kind, k in columns]
        per_seed = {split: [thinking_changes(r[split]) for r in runs.values()] for split in ("val", "ood")}
        cells = ["; ".join(" / ".join(f"{g[kind]:+.1f}%" for g in per_seed[split]) for split in ("val", "ood"))
                 for kind in ("steps", "verify")]
        lines.append(f"| {label} | " + " | ".join(f"{x:.3f}" for x in row) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Plots -----------------------------------------------------------------------

def plot_curves(results, kind, xlabel, path, title):
    """One panel per text (val, OOD): each model's mean CE over seeds, the range across
    seeds shaded; a flat curve (the Transformer++, which does not think) is dashed."""
    from matplotlib.figure import Figure  # no pyplot: nothing global to set up or close
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    for ax, (split, name) in zip(fig.subplots(1, 2), (("val", "validation (Tiny Shakespeare)"),
                                                       ("ood", "OOD (pydoc_data.topics)"))):
        for i, (label, runs) in enumerate(results.items()):
            per_seed = [r[split][kind] for r in runs.values()]
            xs = list(per_seed[0])
            ys = [[c[x] for c in per_seed] for x in xs]
            flat = all(math.isclose(y[0], ys[0][0]) for y in ys)
            ax.plot(xs, [mean(y) for y in ys], marker=None if flat else "o", ls="--" if flat else "-",
                    color=f"C{i}", label=label)
            if len(per_seed) > 1:
                ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=f"C{i}", alpha=0.15)
        if kind == "steps":
            ax.axvline(TRAINED_STEPS, color="gray", ls=":", label="trained steps")
        else:
            ax.set_xscale("log", base=2)
        ax.set(title=name, xlabel=xlabel, ylabel="cross-entropy (nats/char)")
        ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=90)


def plot_changes(results, path):
    """Relative CE change from thinking, in-distribution next to OOD, per model and seed."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.5, 3.4), layout="constrained")
    ax = fig.subplots()
    groups = [(label, kind) for label in results if label != "Transformer++" for kind in ("steps", "verify")]
    names = {"steps": f"{MORE_STEPS} steps", "verify": f"best of {VERIFY}"}
    for j, (split, name) in enumerate((("val", "validation"), ("ood", "OOD"))):
        heights = [mean([thinking_changes(r[split])[kind] for r in results[label].values()]) for label, kind in groups]
        xs = [i + 0.4 * j - 0.2 for i in range(len(groups))]
        ax.bar(xs, heights, width=0.4, label=name, color=f"C{j}")
        for label_kind, x in zip(groups, xs):  # each seed as a dot
            label, kind = label_kind
            ax.plot([x] * len(results[label]), [thinking_changes(r[split])[kind] for r in results[label].values()],
                    "k.", ms=4)
    ax.set_xticks(range(len(groups)), [f"{label}\n{names[kind]}" for label, kind in groups], fontsize=8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set(ylabel="change of cross-entropy (%)\n(below 0: thinking helps)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.suptitle(f"thinking vs {TRAINED_STEPS} steps, 1 candidate: in distribution and out of it")
    fig.savefig(path, dpi=90)


# The whole report --------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out_dir)
    device = ebt.pick_device(args.device)
    common = ["--preset", args.preset, "--device", args.device] + (["--data", args.data] if args.data else [])
    first = args.seeds[0]
    text_dirs = {(label, seed): out / f"{prefix}-seed{seed}"
                 for label, (prefix, _) in TEXT_RUNS.items() for seed in args.seeds}
    text_dirs |= {(label, first): out / f"{prefix}-seed{first}" for label, (prefix, _) in ABLATION.items()}
    flags = {label: f for label, (_, f) in (TEXT_RUNS | ABLATION).items()}
    for (label, seed), d in text_dirs.items():
        ensure_trained(train_text, common + flags[label] + ["--seed", str(seed), "--out_dir", str(d)], d)
    image_dirs = {model: out / f"image-{model}" for model in IMAGE_RUNS}
    for model, d in image_dirs.items():
        ensure_trained(train_image, IMAGE_RUNS[model] + ["--device", args.device, "--seed", str(first),
                                                        "--out_dir", str(d)], d)

    data_text = ebt.text_or_shakespeare(args.data)
    curves = {}
    for (label, seed), d in text_dirs.items():
        print(f"evaluating {d}", flush=True)
        curves.setdefault(label, {})[seed] = text_curves(d / "ckpt.pt", data_text, args.windows, device)
    curves[ZERO_START] = {seed: text_curves(text_dirs["S1", seed] / "ckpt.pt", data_text, args.windows, device,
                                            init_std=0.0) for seed in args.seeds}
    main_results = {label: curves[label] for label in (*TEXT_RUNS, ZERO_START)}
    ablation = {label: {first: curves[label][first]} for label in ("S2", *ABLATION, "S1")}
    train_image.main(["--compare", *map(str, image_dirs.values()), "--out_dir", str(out / "image"),
                      "--device", args.device, "--seed", str(first)])

    plot_curves(main_results, "steps", "thinking steps (1 candidate)", out / "thinking_steps.png",
                "cross-entropy vs thinking steps")
    plot_curves(main_results, "candidates", f"candidates N ({TRAINED_STEPS} steps, lowest energy kept)",
                out / "candidates.png", "cross-entropy vs self-verification candidates")
    plot_changes(main_results, out / "thinking_ood.png")
    plot_curves(ablation, "steps", "thinking steps (1 candidate)", out / "ablation.png",
                f"System 2 training options, each removed in turn (seed {first})")
    seeds = " and ".join(map(str, args.seeds))
    report = "\n\n".join([
        f"Cross-entropy (nats per character, lower is better) on {args.windows} windows of the validation "
        f"split and of the OOD text; mean over seeds {seeds}. Thinking starts from logits of std 0.5 "
        f"(the default), '{ZERO_START}' from zeros.",
        "1. Against thinking steps (1 candidate)\n\n" + curve_table(main_results, "steps", STEPS, "steps"),
        f"2. Against self-verification candidates ({TRAINED_STEPS} steps, lowest final energy kept)\n\n"
        + curve_table(main_results, "candidates", CANDIDATES, "N"),
        f"3. What thinking changes, per seed ({seeds}): {MORE_STEPS} steps against {TRAINED_STEPS}, and the "
        f"best of {VERIFY} candidates against 1 ({TRAINED_STEPS} steps)\n\n" + change_table(main_results),
        f"4. System 2 options, each removed in turn (seed {first})\n\n" + ablation_table(ablation),
        "5. Image denoising\n\n" + (out / "image" / "psnr.md").read_text().strip(),
    ])
    (out / "results.md").write_text(report + "\n")
    (out / "results.json").write_text(json.dumps(curves, indent=1) + "\n")
    print(report)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'} and the plots in {out}")


if __name__ == "__main__":
    ebt.run_cli(main)
