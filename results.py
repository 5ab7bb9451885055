"""
Re-create assets/results.md and the plots of the README's "Results": the paper's claims tested at small
scale on character-level Tiny Shakespeare (train_text.py's CPU preset), on addition problems and on
photographs (train_image.py). Every run is an ordinary driver command, printed before it starts; an
interrupted run is resumed. What each run and table is, and how long they took: assets/results.md.

    python results.py                    # train what is missing in out-results/, then report
    python results.py --seeds 1337       # one seed instead of two: the report goes to out-results/report
    python results.py --lengths 2000     # one training length (the 1500+ step comparison)
    python results.py --part task        # only the addition task: its section of results.md
    python results.py --part ordinary    # only the sums in the ordinary order (the first digit needs every carry)
"""
import cli  # first: a Ctrl-C while torch loads exits quietly
import json
import math
from pathlib import Path

import torch

import bench
import ebt
import measure
import plots
import rundir
import train_image
import train_text
from data import addition, prepare

RUNS = {"Transformer++": ("transformer", ["--model", "transformer"]),  # label -> (directory, flags)
          "S1": ("s1", ["--recipe", "s1"]),
          "S2": ("s2", ["--recipe", "s2"])}
EBTS = ("S1", "S2")
DEEPER = ("Transformer++, 8 layers", "transformer-8layers", ["--model", "transformer", "--n_layer", "8"])
IMAGE_RUNS = {"ebt-s1": ["--model", "ebt"], "ebt-s2": ["--model", "ebt", "--recipe", "s2"],  # train_image.py flags
              "dit": ["--model", "dit"], "regressor": ["--model", "regressor"]}
STEPS = (1, 2, 3, 4, 6, 8, 12)
CANDIDATES = (1, 2, 4, 8, 16)


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    s = p.add_argument
    s("--seeds", type=int, nargs="+", default=[1337, 1338], help="(default: %(default)s)")
    s("--lengths", type=int, nargs="+", default=[250, 500, 1000, 2000],
      help="training lengths in optimizer steps (default: %(default)s)")
    s("--out_dir", default="out-results", help="the runs, and results.json with every number (default: %(default)s)")
    s("--report_dir", help="results.md and the plots (default: assets/, where the README shows them, for the "
      "default runs; else OUT_DIR/report, so that other settings never overwrite the shipped results)")
    s("--windows", type=int, default=64, help="evaluation windows of block_size tokens per text (default: %(default)s)")
    cli.add_device_flag(p)
    s("--preset", default="cpu", choices=train_text.PRESETS, help="train_text.py preset (default: %(default)s)")
    s("--part", default="all", choices=("all", "text", *TASKS, "images"), help="text: Tiny Shakespeare; task: the "
      "addition task; ordinary: the sums in the ordinary order; images: the image models (default: %(default)s)")
    args = p.parse_args(argv)
    for name in ("seeds", "lengths"):
        if len(set(getattr(args, name))) != len(getattr(args, name)):
            raise ebt.UsageError(f"--{name} has repeated values")
    cli.check_flags(args, {"seeds": (int, 0, ebt.MAX_SEED - 1), "lengths": (int, 1, math.inf), "windows": (int, 1, math.inf)})
    default = all(getattr(args, k) == p.get_default(k) for k in ("seeds", "lengths", "out_dir", "windows", "preset"))
    args.report_dir = args.report_dir or ("assets" if default else str(Path(args.out_dir) / "report"))
    rundir.check_out_dir(args.out_dir)
    rundir.check_out_dir(args.report_dir, "--report_dir")
    return args


def ensure_trained(main, argv, out_dir, expect=None):
    """Train the run in out_dir with a driver's main(), or resume it, unless its checkpoint is complete. expect:
    config values an existing run must have (an earlier results.py with another --preset left its runs there)."""
    path = Path(out_dir) / "ckpt.pt"
    if path.exists():
        ckpt = rundir.load_checkpoint(path)
        saved = {**ckpt["model_config"], **ckpt["train_config"]}
        wrong = ", ".join(f"{k} {saved.get(k)} (not {v})" for k, v in (expect or {}).items() if saved.get(k) != v)
        if wrong:
            raise ebt.UsageError(f"{out_dir} holds a run with other settings: {wrong}; pass another --out_dir")
        if ckpt["step"] >= ckpt["train_config"]["max_steps"]:
            return
        argv = [*argv, "--resume"]
    print(f"$ python {main.__module__}.py {' '.join(argv)}", flush=True)
    main(argv)  # a Ctrl-C saves the run and stops results.py (run it again to resume)


def ensure_text_run(args, flags, out_dir, steps, seed):
    argv = ["--preset", args.preset, *flags, "--max_steps", str(steps), "--seed", str(seed), "--out_dir", str(out_dir),
            "--device", args.device]
    preset = {k: v for k, v in train_text.PRESETS[args.preset].items() if f"--{k}" not in flags}  # a flag overrides
    ensure_trained(train_text.main, argv, out_dir, {**preset, "max_steps": steps, "seed": seed})


def step_flops(args, flags, vocab_size):
    run = train_text.parse_args(flags)
    model = run.model or "ebt"
    recipe = ebt.RECIPES[run.recipe or "s1"] if model in ebt.EBT_KINDS else {}
    cfg, tc = cli.configs(run, [train_text.PRESETS[args.preset], recipe, {"model": model, "vocab_size": vocab_size}])
    return bench.flops_per_step(cfg, tc.batch_size, cfg.block_size)


def comparison(args, length, vocab_size):
    """The models compared at `length` optimizer steps: label -> (directory prefix, flags, steps, FLOPs a step). RUNS
    and the deeper Transformer++ train `length` steps; "Transformer++ = S1 FLOPs" (and S2) as many as spend that
    EBT's FLOPs (to 3 significant digits: S1's at 2000 is the learning curve's 10,000), same batch and schedule."""
    flops = {m: step_flops(args, flags, vocab_size) for m, (_, flags) in {**RUNS, DEEPER[0]: DEEPER[1:]}.items()}
    plan = {m: (prefix, flags, length, flops[m]) for m, (prefix, flags) in RUNS.items()}
    for m in EBTS:
        steps = int(float(f"{length * flops[m] / flops['Transformer++']:.3g}"))
        plan[f"Transformer++ = {m} FLOPs"] = (*RUNS["Transformer++"], steps, flops["Transformer++"])
    plan[DEEPER[0]] = (*DEEPER[1:], length, flops[DEEPER[0]])
    return plan


def family(plan, m):  # plot_flops draws a line per model, whatever its steps: the first label of its directories
    return next(label for label, (prefix, *_) in plan.items() if prefix == plan[m][0])


def curves(path, windows, device):
    """Cross-entropy (nats per token) against thinking steps and candidates, on the validation
    split and on the OOD text: {"val" | "ood": {"steps" | "candidates": {k: CE}}, "trained": K}."""
    model, tokenizer = rundir.load_text_model(path, device)
    val, ood, _ = measure.validation_and_ood(tokenizer, prepare.corpus())
    out = {"trained": model.trained_steps() if isinstance(model, ebt.Thinker) else 1}
    for split, ids in (("val", val), ("ood", ood)):
        r = measure.thinking_curves(model, ids, sorted({*STEPS, out["trained"]}), CANDIDATES, windows=windows, seed=0)
        out[split] = {kind: {k: math.log(p) for k, p in r[kind].items()} for kind in ("steps", "candidates")}
        if "verifier" in r:  # an EBT: does its energy rank its candidates?
            out[split]["verifier"] = r["verifier"]
    return out


def mean(values):
    return sum(values) / len(values)


def at_trained(c, split="val"):
    return c[split]["steps"][c["trained"]]


def gains(c, split):
    """What thinking does to one run on one text: thinking 2x and 4x the trained steps, and the
    best of N candidates against 1 (at the trained steps), as perplexity changes."""
    steps, cands, K = c[split]["steps"], c[split]["candidates"], c["trained"]
    out = {f"{t}x steps": measure.ppl_change(steps[K], steps[t * K]) if t * K in steps else math.nan for t in (2, 4)}
    return {**out, **{f"best of {n}": measure.ppl_change(cands[1], cands[n]) for n in CANDIDATES[1:]}}


# Tables (markdown) -------------------------------------------------------------

def learning_table(runs, lengths, seeds, models):
    head, rows = ["optimizer steps", *models, *(f"{m} gap" for m in EBTS)], []
    for n in lengths:
        ce = {m: [at_trained(runs[m, n, s]) for s in seeds] for m in models}
        cells = [" / ".join(f"{v:.3f}" for v in ce[m]) for m in models]
        cells += [" / ".join(f"{100 * (e / t - 1):+.1f}%" for e, t in zip(ce[m], ce["Transformer++"])) for m in EBTS]
        rows.append([str(n), *cells])
    return measure.markdown_table(head, rows)


def steps_table(runs, length, seeds):
    """The CE after step k is the steps curve's after step 1 plus the verifier's changes of steps 2 to k: the same
    descent, measured at every step (the curve only at STEPS)."""
    columns = [(m, split) for split in ("val", "ood") for m in EBTS]
    head, rows = ["thinking step", *(f"{m} {'val' if split == 'val' else 'OOD'}" for m, split in columns)], []
    for k in range(1, max(STEPS) + 1):
        cells = [str(k)]
        for m, split in columns:
            cs = [runs[m, length, s][split] for s in seeds]
            ce = mean([c["steps"][1] + sum(c["verifier"]["CE change"][j] for j in range(2, k + 1)) for c in cs])
            changed = mean([c["verifier"]["argmax changed"][k] for c in cs])
            mark = " (trained)" if k == runs[m, length, seeds[0]]["trained"] else ""
            cells.append(f"{ce:.3f} / {changed:.1%}{mark}")
        rows.append(cells)
    return measure.markdown_table(head, rows)


def gains_table(runs, lengths, seeds):
    kinds = list(gains(runs["S2", lengths[0], seeds[0]], "val"))
    head = ["model", "optimizer steps", *(f"{k} {split}" for split in ("val", "OOD") for k in kinds)]
    rows = [[m, str(n), *(" / ".join(f"{gains(runs[m, n, s], split)[k]:+.1f}%" for s in seeds)
                          for split in ("val", "ood") for k in kinds)] for m in ("S2", "S1") for n in lengths]
    return measure.markdown_table(head, rows)


def flops_table(plan):
    base = plan["Transformer++"][3]
    return measure.markdown_table(["model", "FLOPs a step", "x Transformer++", "optimizer steps", "training FLOPs"],
                                  [[m, f"{f:.3g}", f"{f / base:.2f}", str(n), f"{n * f:.3g}"]
                                   for m, (_, _, n, f) in plan.items()])


def verifier_table(runs, lengths, seeds):
    n, rows = max(CANDIDATES), []
    gain = lambda x, pick: measure.ppl_change(x["best of"]["random"][n], x["best of"][pick][n])  # against a random pick
    for length in lengths:
        for m in EBTS:
            for split in ("val", "ood"):
                v = [runs[m, length, s][split]["verifier"] for s in seeds]
                rows.append([str(length), f"{m} {'val' if split == 'val' else 'OOD'}",
                             *(" / ".join(f"{x[k]:+.2f}" for x in v) for k in ("correlation", "entropy correlation")),
                             *(" / ".join(f"{gain(x, pick):+.1f}%" for x in v) for pick in ("energy", "oracle"))])
    return measure.markdown_table(["optimizer steps", "model, text", "Spearman(final energy, CE)",
                                   "Spearman(final energy, entropy)", f"best of {n} by energy",
                                   f"best of {n} by CE (oracle)"], rows)


# Plots -------------------------------------------------------------------------

def draw_seeds(ax, xs, ys, **style):
    """The mean over seeds at each x, their range shaded: ys[j] holds every seed's value at xs[j]."""
    ax.plot(xs, [mean(y) for y in ys], **{"marker": "o", **style})
    ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=style["color"], alpha=0.15)


def plot_gap(runs, lengths, seeds, path):
    fig = plots.figure(figsize=(9, 3.6), layout="constrained")
    ce_ax, gap_ax = fig.subplots(1, 2)
    ce = lambda m, n: [at_trained(runs[m, n, s]) for s in seeds]
    for i, m in enumerate(RUNS):
        draw_seeds(ce_ax, lengths, [ce(m, n) for n in lengths], color=f"C{i}", label=m)
    for i, m in enumerate(EBTS, 1):
        gap = [[100 * (e / t - 1) for e, t in zip(ce(m, n), ce("Transformer++", n))] for n in lengths]
        draw_seeds(gap_ax, lengths, gap, color=f"C{i}", label=m)
    gap_ax.axhline(5, color="gray", ls=":", label="5% target")
    ce_ax.set(ylabel="validation CE (nats/char)", title="learning: CE at the trained steps")
    gap_ax.set(ylabel="EBT CE / Transformer++ CE - 1 (%)", title="the EBTs' gap to the Transformer++")
    for ax in (ce_ax, gap_ax):
        ax.set(xscale="log", xlabel="optimizer steps (same batch)")
        plots.grid_at(ax, lengths)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=90)


def plot_flops(runs, loss, ylabel, title, path):
    """Loss against training FLOPs, a line per model family: every Transformer++ of a size (equal steps, equal
    FLOPs, learning curve) is one line. runs: {key: scores with "family" and "flops"}, loss(scores)."""
    fig = plots.figure(figsize=(6.4, 4), layout="constrained")
    ax = fig.subplots()
    families = {}
    for c in runs.values():
        families.setdefault(c["family"], {}).setdefault(c["flops"], []).append(loss(c))
    for i, (name, at) in enumerate(families.items()):
        draw_seeds(ax, sorted(at), [at[x] for x in sorted(at)], color=f"C{i}", label=name)
    ax.set(xscale="log", xlabel="training FLOPs (bench.py's count)", ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=90)


def plot_curves(runs, length, seeds, kind, path):
    steps = kind == "steps"
    xlabel = "thinking steps (1 candidate)" if steps else "candidates N (trained steps, lowest energy kept)"
    fig = plots.figure(figsize=(9, 3.6), layout="constrained")
    for ax, (split, name) in zip(fig.subplots(1, 2), (("val", "validation (Tiny Shakespeare)"),
                                                       ("ood", "OOD (pydoc_data.topics)"))):
        for i, m in enumerate(RUNS):
            per_seed = [runs[m, length, s][split][kind] for s in seeds]
            xs, flat = list(per_seed[0]), m == "Transformer++"
            draw_seeds(ax, xs, [[c[x] for c in per_seed] for x in xs], marker=None if flat else "o",
                       ls="--" if flat else "-", color=f"C{i}", label=m)
            if steps and not flat:
                ax.axvline(runs[m, length, seeds[0]]["trained"], color=f"C{i}", ls=":", lw=1,
                           label=f"{m}: trained steps")
        if not steps:
            ax.set_xscale("log", base=2)
        plots.grid_at(ax, xs)
        ax.set(title=name, xlabel=xlabel, ylabel="cross-entropy (nats/char)")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right center", fontsize=9)
    fig.suptitle(f"cross-entropy vs {'thinking steps' if steps else 'self-verification candidates'} "
                 f"({length} optimizer steps)")
    fig.savefig(path, dpi=90)


def plot_gains(runs, lengths, seeds, path):
    fig = plots.figure(figsize=(10, 3.8), layout="constrained")
    for ax, (split, name) in zip(fig.subplots(1, 2), (("val", "validation"), ("ood", "OOD"))):
        for i, kind in enumerate(("2x steps", "4x steps", "best of 4", "best of 16")):
            values = [[gains(runs["S2", n, s], split)[kind] for s in seeds] for n in lengths]
            draw_seeds(ax, lengths, values, color=f"C{i}", label=kind)
        ax.axhline(0, color="black", lw=0.8)
        ax.set(xscale="log", title=f"S2, {name}", xlabel="optimizer steps trained", ylabel="perplexity change (%)")
        plots.grid_at(ax, lengths)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right center", fontsize=9)
    fig.suptitle("what thinking more changes, against the trained steps and one candidate (below 0: it helps)")
    fig.savefig(path, dpi=90)


def plot_verifier(runs, lengths, length, seeds, path):
    fig = plots.figure(figsize=(10, 7.6), layout="constrained")
    (s1_ax, s2_ax), (best_ax, length_ax) = fig.subplots(2, 2)
    for ax, m in ((s1_ax, "S1"), (s2_ax, "S2")):
        plots.draw_candidates(ax, runs[m, length, seeds[0]]["val"]["verifier"], f"{m}, validation, seed {seeds[0]}")
    s1_ax.legend(fontsize=8)
    for i, m in enumerate(EBTS, 1):
        for split, name in (("val", "val"), ("ood", "OOD")):
            plots.draw_best_of(best_ax, runs[m, length, seeds[0]][split]["verifier"], f"{m} {name}",
                               f"C{i}" if split == "val" else f"C{i + 2}")
            spearman = [[runs[m, n, s][split]["verifier"]["correlation"] for s in seeds] for n in lengths]
            draw_seeds(length_ax, lengths, spearman, ls="-" if split == "val" else "--", color=f"C{i}",
                       label=f"{m} {name}")
    best_ax.set_title(f"best of n, {length} optimizer steps, seed {seeds[0]}", fontsize=10)
    best_ax.legend(fontsize=7, ncols=2, loc="lower left")
    length_ax.axhline(0, color="gray", lw=0.8)
    length_ax.set(xscale="log", xlabel="optimizer steps trained", ylabel="Spearman(final energy, CE), seed mean",
                  title="does ranking grow with training?")
    plots.grid_at(length_ax, lengths)
    length_ax.legend(fontsize=8)
    fig.suptitle("does the energy rank its candidates? (16 candidates per position)")
    fig.savefig(path, dpi=90)


# The addition task: does thinking pay where the answer is certain? -----------------------------

TASK_DATA = Path(__file__).resolve().parent / "data"  # data/addition.py writes each task's folder there
TASKS = {  # --part: (section title, folder, data/addition.py's options, the Transformer++'s learning curve)
    "task": ("The addition task", "addition", {"digits": 5}, ()),
    "ordinary": ("Sums in the ordinary order", "addition-ordinary", {"digits": 3, "ordinary": True},
                 (500, 1000, 2000, 4000, 10_000)),
}
TASK_LENGTH = 2000  # optimizer steps: the Transformer++ answers about half the digits (reversed, 5 digits) there
TASK_PROBLEMS = 512  # evaluated per text
TOLERANCES = (1e-2, 1e-3)  # adaptive stopping


def task_problems(text, tokenizer, T, count, ordinary=False):
    """The first `count` problems of a text with T characters before their answer's end: windows x, y (count, T)
    whose targets end with the answer; `answer`, True at its targets (digits and newline); `chain`, how far the
    carry into each answer digit came (addition.carry_chains); prompts (count, T - 10) ending "=", answers as text."""
    x, y, answer, chain, prompts, answers = [], [], [], [], [], []
    for start, end in addition.answer_spans(text):
        if len(x) == count:
            break
        if end - 1 < T:  # too near the start for a whole window
            continue
        ids = torch.tensor(tokenizer.encode(text[end - 1 - T:end]))
        x.append(ids[:-1]), y.append(ids[1:])
        a, b = map(int, text[text.rfind("\n", 0, start) + 1:start - 1].split("+"))
        chains = addition.carry_chains(a, b)  # least significant digit first
        into = (chains[::-1] if ordinary else chains) + [0]
        answer.append(torch.arange(T) >= T - (end - start))
        chain.append(torch.tensor([0] * (T - len(into)) + into))
        prompts.append(torch.tensor(tokenizer.encode(text[start - (T - 10):start])))
        answers.append(text[start:end])
    stack = torch.stack
    return dict(x=stack(x), y=stack(y), answer=stack(answer), chain=stack(chain), prompts=stack(prompts),
                answers=answers)


def at_answers(t, answer):
    """t (B, N, T) -> (1, N, M): the values at the M answer positions, every candidate of each."""
    return t.movedim(1, -1)[answer].T[None]


@torch.no_grad()
def task_scores(model, problems, tokenizer, steps, candidates=max(CANDIDATES), chunk=64):
    """The measures of task_part's tables T1 to T5 on one text's problems, answer tokens only."""
    device, thinks = next(model.parameters()).device, isinstance(model, ebt.TextEBT)
    g = torch.Generator().manual_seed(0)
    parts = []
    for i in range(0, len(problems["x"]), chunk):
        x, y, answer, chain = (problems[k][i:i + chunk].to(device) for k in ("x", "y", "answer", "chain"))
        part = {"answer_chain": chain[answer]}
        parts.append(part)
        if not thinks:
            part["per_step"] = [model.logits(x)[0][answer]] * len(steps)
            continue
        # only the last P positions think: every answer ends its window (a prediction sees no other)
        context, P = model.context(x), int(answer.sum(1).max())
        y, answer = y[:, -P:], answer[:, -P:]
        one = model.think_candidates(context, P, 1, g, steps=max(steps))
        part["per_step"] = [one.ys[k][:, 0][answer] for k in steps]
        part["argmax"] = torch.stack([y_[:, 0][answer].argmax(-1) for y_ in one.ys])  # (K + 1, M)
        torch.manual_seed(i)  # the candidates' inference noise
        many = model.think_candidates(context, P, candidates, g)
        energy = many.energies[-1]  # (B, N, P)
        part["candidates"] = (at_answers(many.ys[-1].log_softmax(-1).gather(-1, y[:, None, :, None].expand(
            -1, candidates, -1, 1)).squeeze(-1), answer),  # log-probability of the truth, (1, N, M)
            at_answers((many.ys[-1].argmax(-1) == y[:, None]).double(), answer),
            at_answers(-(many.ys[-1].softmax(-1) * many.ys[-1].log_softmax(-1)).sum(-1), answer),
            at_answers(energy, answer))
        part["steps_used"] = {tol: model.think_candidates(context, P, 1, g, steps=max(steps),
                                                          tolerance=tol).steps_used[:, 0][answer] for tol in TOLERANCES}
    targets = problems["y"][problems["answer"]].to(device)
    out = {"steps": {}}
    for j, k in enumerate(steps):
        logits = torch.cat([p["per_step"][j] for p in parts]).float()
        out["steps"][k] = {"acc": (logits.argmax(-1) == targets).double().mean().item(),
                           "ce": torch.nn.functional.cross_entropy(logits, targets).item()}
    if not thinks:
        return {**out, "exact": dict.fromkeys(steps, exact_match(model, problems, tokenizer, None, chunk))}
    out["exact"] = {k: exact_match(model, problems, tokenizer, k, chunk) for k in steps}
    log_p, correct, entropy, energy = (torch.cat([p["candidates"][c] for p in parts], dim=-1) for c in range(4))
    ce, random_pick = -log_p, torch.zeros_like(energy)
    out["best of"] = {pick: {n: {"acc": 1 - measure.best_of(1 - correct[:, :n], score[:, :n]).mean().item(),
                                 "ce": measure.best_of(ce[:, :n], score[:, :n]).mean().item()}
                             for n in CANDIDATES if n <= candidates}
                      for pick, score in (("energy", energy), ("random", random_pick), ("oracle", ce))}
    out["spearman ce"] = measure.spearman(energy, ce).mean().item()
    out["spearman entropy"] = measure.spearman(energy, entropy).mean().item()
    argmax = torch.cat([p["argmax"] for p in parts], dim=1)
    out["argmax changed"] = {k: (argmax[k] != argmax[k - 1]).double().mean().item() for k in range(1, len(argmax))}
    chain = torch.cat([p["answer_chain"] for p in parts])
    digit = targets != tokenizer.encode("\n")[0]
    digits = {"carry": digit & (chain > 0), "no carry": digit & (chain == 0), "long carry": digit & (chain > 1)}
    out["adaptive"] = {}
    for tol in TOLERANCES:
        used = torch.cat([p["steps_used"][tol] for p in parts]).double()
        out["adaptive"][tol] = {"all": used.mean().item(), **{k: used[d].mean().item() for k, d in digits.items()}}
    return out


@torch.no_grad()
def exact_match(model, problems, tokenizer, steps, chunk):
    """The share of problems whose whole answer greedy generation writes exactly (thinking `steps` steps)."""
    device, right = next(model.parameters()).device, 0
    longest = max(map(len, problems["answers"]))
    for i in range(0, len(problems["prompts"]), chunk):
        prompts = problems["prompts"][i:i + chunk].to(device)
        thinking = {"steps": steps} if steps else {}
        out = ebt.generate(model, prompts, longest, temperature=0, generator=torch.Generator().manual_seed(i), **thinking)
        for row, answer in zip(out.idx[:, prompts.shape[1]:].tolist(), problems["answers"][i:i + chunk]):
            right += tokenizer.decode(row[:len(answer)]) == answer
    return right / len(problems["prompts"])


def task_runs(args, out, device, part):
    """Train what is missing of a task's runs (comparison()'s, then the Transformer++'s learning curve), measure
    each. Returns the scores per (label, seed), and the labels, each run folder once."""
    _, folder, options, curve = TASKS[part]
    data = TASK_DATA / folder
    if not all((data / f"{split}.txt").exists() for split in ("train", "val", "ood")):
        addition.write(data, **options)
    plan = comparison(args, TASK_LENGTH, len(set((data / "train.txt").read_text())))  # the characters: the vocabulary
    base = plan["Transformer++"]
    curve_plan = {f"Transformer++, {n} steps": (*base[:2], n, base[3]) for n in curve}
    name = "task" if part == "task" else "sums"
    dirs = {(m, s): out / f"{name}-{prefix}-{steps}-seed{s}"
            for p in (plan, curve_plan) for s in args.seeds for m, (prefix, _, steps, _) in p.items()}
    plan.update(curve_plan)
    for (m, s), d in dirs.items():
        ensure_text_run(args, [*plan[m][1], "--data", str(data / "train.txt")], d, plan[m][2], s)
    scores, runs, labels = {}, {}, []
    for (m, s), d in dirs.items():
        if d not in scores:  # a step count of the curve that comparison() has (TASK_LENGTH, S1's FLOPs): its run
            scores[d] = task_run_scores(d, data, device, options.get("ordinary", False))
            labels.append(m)
        runs[m, s] = {**scores[d], "family": family(plan, m), "flops": plan[m][2] * plan[m][3]}
    return runs, list(dict.fromkeys(labels))


def task_run_scores(run_dir, data, device, ordinary):
    print(f"evaluating {run_dir.name}", flush=True)
    model, tokenizer = rundir.load_text_model(run_dir / "ckpt.pt", device)
    K = model.trained_steps() if isinstance(model, ebt.Thinker) else 1
    steps = sorted({1, K, 2 * K, 4 * K}) if isinstance(model, ebt.Thinker) else [1]  # the Transformer++: once
    return {"trained": K, **{split: task_scores(model, task_problems((data / f"{split}.txt").read_text(), tokenizer,
                                                                     model.config.block_size, TASK_PROBLEMS, ordinary),
                                                tokenizer, steps) for split in ("val", "ood")}}


def task_tables(runs, seeds, labels):
    """The task's tables (markdown): each cell one value per seed, "a / b"; T1 a row per label."""
    splits = (("val", "in"), ("ood", "OOD"))
    cell = lambda m, get, fmt="{:.1%}": " / ".join("-" if get(runs[m, s]) is None else fmt.format(get(runs[m, s]))
                                                   for s in seeds)
    at = lambda c, split, times, what: c[split][what][max(1, times * c["trained"])]
    base = runs["Transformer++", seeds[0]]["flops"]
    learning = measure.markdown_table(
        ["model", "training FLOPs", "accuracy in", "accuracy OOD", "CE in", "CE OOD", "exact match in", "exact match OOD"],
        [[m, f"{runs[m, seeds[0]]['flops'] / base:.2f}x", *(cell(m, lambda c, sp=sp: at(c, sp, 1, "steps")["acc"])
                                                              for sp, _ in splits),
          *(cell(m, lambda c, sp=sp: at(c, sp, 1, "steps")["ce"], "{:.3f}") for sp, _ in splits),
          *(cell(m, lambda c, sp=sp: at(c, sp, 1, "exact")) for sp, _ in splits)] for m in labels])
    thinking = measure.markdown_table(
        ["model", "thinking steps", "accuracy in", "accuracy OOD", "exact match in", "exact match OOD"],
        [[m, label, *(cell(m, lambda c, sp=sp, t=t: at(c, sp, t, "steps")["acc"]) for sp, _ in splits),
          *(cell(m, lambda c, sp=sp, t=t: at(c, sp, t, "exact")) for sp, _ in splits)]
         for m in EBTS for label, t in (("1", 0), ("as trained", 1), ("2x", 2), ("4x", 4))])
    picks = [(n, pick) for n in (4, 16) for pick in ("energy", "random", "oracle")]
    verify = measure.markdown_table(
        ["model, text", "Spearman(E, CE)", "Spearman(E, entropy)", *(f"best of {n}, {p}" for n, p in picks)],
        [[f"{m} {name}", *(cell(m, lambda c, sp=sp, k=k: c[sp][k], "{:+.2f}") for k in ("spearman ce", "spearman entropy")),
          *(cell(m, lambda c, sp=sp, n=n, p=p: c[sp]["best of"][p][n]["acc"]) for n, p in picks)]
         for m in EBTS for sp, name in splits])
    most = max(4 * runs[m, seeds[0]]["trained"] for m in EBTS)
    changes = measure.markdown_table(
        ["model, text", *(f"step {k}" for k in range(1, most + 1))],
        [[f"{m} {name}", *(cell(m, lambda c, sp=sp, k=k: c[sp]["argmax changed"].get(k), "{:.0%}")
                          for k in range(1, most + 1))] for m in EBTS for sp, name in splits])
    digits = {"all": "answer tokens", "carry": "digits carried into", "no carry": "digits not carried into",
              "long carry": "digits a carry came 2+ places to"}
    adaptive = measure.markdown_table(
        ["model, tolerance", *(f"{what}, {name}" for _, name in splits for what in digits.values())],
        [[f"{m}, {tol:g}", *(cell(m, lambda c, sp=sp, w=w, tol=tol: c[sp]["adaptive"][tol][w], "{:.2f}")
                             for sp, _ in splits for w in digits)] for m in EBTS for tol in TOLERANCES])
    return learning, thinking, verify, changes, adaptive


def plot_task(runs, seeds, path):
    fig = plots.figure(figsize=(10, 3.8), layout="constrained")
    steps_ax, best_ax = fig.subplots(1, 2)
    for i, m in enumerate(RUNS):
        for split, style in (("val", "-"), ("ood", "--")):
            per_seed = [runs[m, s][split]["steps"] for s in seeds]
            ks = sorted(per_seed[0])
            acc = [[p[k]["acc"] for p in per_seed] for k in ks]
            label = f"{m} {'in distribution' if split == 'val' else 'OOD'}"
            if m in EBTS:
                draw_seeds(steps_ax, ks, acc, ls=style, color=f"C{i}", label=label)
            else:  # one answer, whatever the steps
                steps_ax.axhline(mean(acc[0]), ls=style, color=f"C{i}", lw=1, label=label)
    steps_ax.set(xscale="log", xlabel="thinking steps (1 candidate)", ylabel="answer-token accuracy",
                 title="thinking longer")
    ticks = sorted({k for m in EBTS for k in runs[m, seeds[0]]["val"]["steps"]})
    plots.grid_at(steps_ax, ticks)
    for i, m in enumerate(EBTS, 1):
        best = [runs[m, s]["val"]["best of"] for s in seeds]
        ns = sorted(best[0]["energy"])
        for pick, style, how in (("energy", "-", "by energy"), ("random", "--", "at random"), ("oracle", ":", "by the truth")):
            draw_seeds(best_ax, ns, [[b[pick][n]["acc"] for b in best] for n in ns], ls=style, ms=3, color=f"C{i}",
                       label=f"{m}: {how}")
    best_ax.set(xscale="log", xlabel="candidates n (trained steps)", ylabel="answer-token accuracy, in distribution",
                title="self-verification: the best of n")
    plots.grid_at(best_ax, ns)
    for ax in (steps_ax, best_ax):
        ax.legend(fontsize=7)
    fig.suptitle("the addition task: answer tokens only")
    fig.savefig(path, dpi=90)


# The whole report --------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    out, report_dir = Path(args.out_dir), Path(args.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    device = cli.pick_device(args.device)
    if args.part in ("all", "text"):
        text_part(args, out, report_dir, device)
    for part in TASKS:
        if args.part in ("all", part):
            task_part(args, out, report_dir, device, part)
    if args.part in ("all", "images"):
        images_part(args, out, report_dir)


def write_section(path, title, body):
    """results.md holds a section per part (## title), each rewritten by its own part, the others kept."""
    text = Path(path).read_text() if Path(path).exists() else ""
    head, *sections = text.split("\n## ")
    kept = {s.split("\n", 1)[0]: s.split("\n", 1)[1].strip() for s in sections}
    kept[title] = body.strip()
    head = head.strip() or "# Results\n\nMade by `python results.py` (see README, Results); `--part` remakes one section."
    rundir.write_atomically(path, lambda tmp: tmp.write_text(
        head + "\n\n" + "\n\n".join(f"## {t}\n\n{b}" for t, b in kept.items()) + "\n"))


def task_part(args, out, report_dir, device, part):
    title, _, options, curve = TASKS[part]
    (runs, labels), seeds, digits = task_runs(args, out, device, part), args.seeds, options["digits"]
    plot_task(runs, seeds, report_dir / f"{part}.png")
    plot_flops(runs, lambda c: at_trained(c)["ce"], "answer-token CE in distribution (nats)", title,
               report_dir / f"{part}_flops.png")
    learning, thinking, verify, changes, adaptive = task_tables(runs, seeds, labels)
    report = "\n\n".join([
        f"`python results.py --part {part}`: multi-digit addition (`data/addition.py`: operands of 1 to {digits} digits, "
        f"the sum written {'most' if options.get('ordinary') else 'least'} significant digit first; OOD: {digits + 1} "
        f"to {digits + 2} digits), `--preset {args.preset}`, {TASK_LENGTH} optimizer steps, every model at equal batch, "
        f"seeds {' / '.join(map(str, seeds))} (each cell gives both). Answer tokens only (the sum's digits and the "
        f"newline that ends it), {TASK_PROBLEMS} problems per text, each read with the problems before it as context.",
        "T1. Teacher forcing at the trained steps (accuracy of the argmax, cross-entropy in nats), and exact match "
        "of whole answers generated greedily (temperature 0) thinking the trained steps; beside the EBTs a "
        "Transformer++ trained on each one's FLOPs and one of 8 layers at equal steps"
        + (", and the Transformer++'s learning curve: how many steps reach the EBTs' accuracy" if curve else "")
        + f" (training FLOPs: against the Transformer++'s {TASK_LENGTH} steps)\n\n" + learning,
        "T2. Thinking longer: the same after 1, the trained, 2x and 4x the trained steps (one candidate, no noise)"
        "\n\n" + thinking,
        "T3. Does the energy verify: across 16 candidates per answer token (trained steps, Langevin noise 1), "
        "Spearman's correlation of the final energy with each candidate's cross-entropy and with its entropy, and "
        "the accuracy of the best of n picked by lowest energy, at random, and by the truth (oracle)\n\n" + verify,
        "T4. What each thinking step does: the share of answer tokens whose most likely value the step changes"
        "\n\n" + changes,
        "T5. Adaptive stopping (`--tolerance`, at most 4x the trained steps): mean steps a token thinks before "
        "a step lowers its energy by less than the tolerance; harder tokens are the digits a carry comes into "
        "(the more, the farther it came: `addition.carry_chains`), and the longer OOD sums\n\n" + adaptive])
    write_section(report_dir / "results.md", title, report)
    rundir.write_atomically(out / f"{part}.json", lambda tmp: tmp.write_text(
        json.dumps({f"{m}|{s}": c for (m, s), c in runs.items()}, indent=1) + "\n"))
    print(report)
    print(f"wrote {report_dir / 'results.md'} (its section {title}), {report_dir / part}.png, "
          f"{report_dir / part}_flops.png, {out / part}.json")


def text_part(args, out, report_dir, device):
    lengths, seeds = sorted(args.lengths), args.seeds
    plans = {n: comparison(args, n, prepare.corpus().tokenizer.vocab_size) for n in lengths}
    dirs = {(m, n, s): out / f"{prefix}-{steps}-seed{s}" for n in lengths for m, (prefix, _, steps, _) in plans[n].items()
            for s in seeds}
    # the main comparison (the shortest length of 1500 steps or more) first: it matters most
    main_length = min((n for n in lengths if n >= 1500), default=max(lengths))
    for m, n, s in sorted(dirs, key=lambda key: (key[1] != main_length, key[1], key[2])):
        ensure_text_run(args, plans[n][m][1], dirs[m, n, s], plans[n][m][2], s)

    runs, models = {}, list(plans[main_length])
    for (m, n, s), d in dirs.items():
        print(f"evaluating {d}", flush=True)
        runs[m, n, s] = curves(d / "ckpt.pt", args.windows, device)
        runs[m, n, s].update(family=family(plans[n], m), flops=plans[n][m][2] * plans[n][m][3])
    plot_gap(runs, lengths, seeds, report_dir / "gap.png")
    plot_flops(runs, at_trained, "validation CE (nats/char)", "Tiny Shakespeare", report_dir / "flops.png")
    plot_curves(runs, main_length, seeds, "steps", report_dir / "thinking_steps.png")
    plot_curves(runs, main_length, seeds, "candidates", report_dir / "candidates.png")
    plot_gains(runs, lengths, seeds, report_dir / "gains.png")
    plot_verifier(runs, lengths, main_length, seeds, report_dir / "verifier.png")
    report = "\n\n".join([
        f"Cross-entropy in nats per character (lower is better) on {args.windows} windows of the validation "
        f"split of Tiny Shakespeare and of the OOD text (pydoc_data.topics), `--preset {args.preset}`. "
        f"Per-seed values are given as {' / '.join(map(str, seeds))}; curves are means over the seeds.",
        "1. Learning: validation CE at the trained steps (S1 2, S2 3) and the EBTs' gap to the Transformer++, "
        "at equal optimizer steps and batch; beside them a Transformer++ trained on each EBT's FLOPs (its steps "
        "scaled by the ratio of FLOPs a step, same batch) and one of 8 layers at equal steps (FLOPs: 5)\n\n"
        + learning_table(runs, lengths, seeds, models),
        f"2. Thinking longer ({main_length} optimizer steps, 1 candidate, no noise): CE after each step / the share "
        "of positions whose most likely token that step changes\n\n" + steps_table(runs, main_length, seeds),
        "3. What thinking more changes, as a perplexity change against the trained steps and one candidate, at "
        "each training length (negative: thinking helps): thinking 2x and 4x the trained steps, and the best of N "
        "candidates (trained steps, Langevin noise 1, the lowest final energy kept)\n\n"
        + gains_table(runs, lengths, seeds),
        "4. Does the energy rank its candidates? Across the 16 candidates of a position (as in 3), averaged over "
        "positions: Spearman's correlation of the final energy with the cross-entropy, and with the candidate's "
        "entropy (does it measure confidence); the best of 16 picked by energy and by the true cross-entropy (a "
        "perfect verifier), as a perplexity change against a random pick\n\n" + verifier_table(runs, lengths, seeds),
        f"5. FLOPs a training step (`bench.flops_per_step`: model FLOPs, matmuls only), {main_length} optimizer "
        "steps; at the other lengths the same ratios\n\n" + flops_table(plans[main_length]),
    ])
    write_section(report_dir / "results.md", "Tiny Shakespeare", report)
    numbers = json.dumps({f"{m}|{n}|{s}": c for (m, n, s), c in runs.items()}, indent=1) + "\n"
    rundir.write_atomically(out / "results.json", lambda tmp: tmp.write_text(numbers))
    print(report)
    print(f"wrote {report_dir / 'results.md'} and the plots in {report_dir}, {out / 'results.json'}")


def images_part(args, out, report_dir):
    seeds = args.seeds
    image_dirs = [out / f"image-{name}" for name in IMAGE_RUNS]
    for d, flags in zip(image_dirs, IMAGE_RUNS.values()):
        ensure_trained(train_image.main, [*flags, "--seed", str(seeds[0]), "--out_dir", str(d), "--device", args.device], d)
    train_image.main(["--compare", *map(str, image_dirs), "--out_dir", str(report_dir / "image"), "--device",
                      args.device, "--seed", str(seeds[0]), "--passes", *map(str, train_image.DIT_PASSES)])


if __name__ == "__main__":
    cli.invoke(main)
