"""
What thinking does, measured on text: every position of a text thought about at once; perplexity after more
steps and with more candidates, and whether the energy ranks its candidates; the texts it is measured on, and its tables.
Imported by sample.py, results.py, plots.py and the notebook.
"""
import contextlib
import math
import sys
from dataclasses import dataclass

import torch

import ebt
import rundir
from data.text import random_windows


@dataclass
class TextThinking:
    """An EBT thinking at every position of a text at once (teacher-forced)."""
    ids: torch.Tensor   # (T + 1,) the text's tokens; position i sees ids[:i+1] and predicts ids[i+1]
    labels: list        # T readable labels of the predicted tokens ids[1:]
    traj: ebt.Trajectory    # ys: K+1 tensors (1, T, V); energies: K+1 tensors (1, T)
    context: list       # per-layer (k, v) of ids[:-1], each (1, H, T, Dh)


def token_label(tokenizer, i):
    return tokenizer.decode([i]).replace("\n", "\\n").replace(" ", "␣")


@torch.no_grad()
def think_on_text(model, tokenizer, text, steps=None, seed=0):
    """Think about every next token of the text's last block_size + 1 tokens, from seeded random starts, at once."""
    rundir.require_ebt(model, "plotting the energy")
    ids = torch.tensor(tokenizer.encode(text)[-(model.config.block_size + 1):])
    if len(ids) < 2:
        raise ebt.UsageError(f"the text {text!r} is too short to plot: it needs at least 2 tokens")
    device = next(model.parameters()).device
    context = model.context(ids[None, :-1].to(device))
    traj = model.think_candidates(context, len(ids) - 1, 1, torch.Generator().manual_seed(seed),
                                  steps=steps or ebt.THINK_LONGER * model.trained_steps())
    traj = ebt.Trajectory([y[:, 0] for y in traj.ys], [e[:, 0] for e in traj.energies])
    return TextThinking(ids, [token_label(tokenizer, i) for i in ids[1:].tolist()], traj, context)


@contextlib.contextmanager
def progress(model, what, total, by_energies=True):
    """A rundir.Progress of `total` energies scored (a position's candidates, at a step), counted by a hook on an
    EBT's energy head, so that it moves within a long thinking too (not in a compiled graph: by_energies False)."""
    shown = rundir.Progress(what, total)
    count = lambda module, inputs, energies: shown.advance(energies.numel())
    counting = by_energies and isinstance(model, ebt.TextEBT)
    with model.energy_head.register_forward_hook(count) if counting else contextlib.nullcontext():  # removed on leaving
        yield shown


def energies_scored(positions, steps, candidates=1, tolerance=None):
    """What progress() counts of one thinking from each of `candidates` starts at `positions` positions: every step
    scores a start, and the final state is scored; adaptively (think_adaptively) twice a step, at most."""
    return positions * candidates * (2 * steps if tolerance is not None else steps + 1)


@torch.no_grad()
def thinking_curves(model, ids, steps=(1, 2, 4, 8), candidates=(1, 2, 4, 8), windows=16, seed=0):
    """Perplexity on fixed windows of a 1-D token tensor after each number of thinking steps (one candidate),
    and with each number N of candidates at the trained steps, keeping the lowest final energy. N = 1 is thinking
    as trained, without noise: what self-verification is measured against; N > 1: the first N of max(candidates),
    each with the paper's inference noise. Flat for the Transformer++. Repeatable: seed fixes windows, starts and
    noise. An EBT's result also holds "verifier": does the energy rank its candidates (see verifier())?"""
    if len(ids) <= model.config.block_size:
        raise ebt.UsageError(f"{len(ids)} tokens are too few to evaluate on: need more than "
                             f"block_size={model.config.block_size}")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x, y = (t.to(device) for t in random_windows(ids, model.config.block_size, windows, g))
    ppl = lambda logits: math.exp(ebt.cross_entropy(logits.float(), y).item())
    if not isinstance(model, ebt.TextEBT):
        flat = ppl(model.logits(x)[0])
        return {"steps": {k: flat for k in steps}, "candidates": {n: flat for n in candidates}}
    context, trained = model.context(x), model.trained_steps()
    one = model.think_candidates(context, x.shape[1], 1, g, steps=max(*steps, trained))
    by_steps = {k: ppl(one.ys[k][:, 0]) for k in steps}
    single = ppl(one.ys[trained][:, 0])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the noise, seeded
        torch.manual_seed(seed)
        many = model.think_candidates(context, x.shape[1], max(candidates), g)
    final = many.energies[-1]  # (W, N, S)
    by_candidates = {n: single if n == 1 else ppl(ebt.keep_lowest(many.ys[-1][:, :n], final[:, :n]))
                     for n in candidates}
    return {"steps": by_steps, "candidates": by_candidates,
            "verifier": verifier([y_[:, 0] for y_ in one.ys], many.ys[-1], final, y, candidates)}


def verifier(ys, candidates_ys, final_energy, targets, counts, examples=4):
    """Can the energy tell a good candidate from a bad one? From one noiseless descent's states ys
    [(W, S, V)] and the final logits (W, N, S, V) and energies (W, N, S) of N noisy candidates:
    - "correlation": Spearman's, between final energy and cross-entropy across the N candidates of a
      position, averaged over positions (1: the energy ranks them as the truth does; 0: not at all);
      "entropy correlation": the same with each candidate's entropy (1: the energy measures confidence);
    - "best of": the cross-entropy (nats) of the best of the first n candidates picked by "energy"
      (self-verification), at "random", and by the cross-entropy itself ("oracle": a perfect verifier);
    - per thinking step k: "argmax changed", the share of positions whose most likely token step k
      changed, and "CE change", what step k did to the cross-entropy (nats; does a step do anything?);
    - "examples": the candidates' final energies and cross-entropies at a few positions, for a plot."""
    loss = torch.nn.functional.cross_entropy(candidates_ys.float().movedim(-1, 1),  # (W, N, S)
                                             targets[:, None].expand(candidates_ys.shape[:-1]), reduction="none")
    log_p = candidates_ys.float().log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)  # (W, N, S)
    picks = {"energy": final_energy, "random": torch.zeros_like(loss), "oracle": loss}
    step_ce = [ebt.cross_entropy(y_.float(), targets).item() for y_ in ys]
    where = torch.linspace(0, loss.shape[0] * loss.shape[2] - 1, examples).long()
    flat = lambda t: t.movedim(1, -1).flatten(0, 1)[where]  # (examples, N)
    return {"correlation": spearman(final_energy, loss).mean().item(),
            "entropy correlation": spearman(final_energy, entropy).mean().item(),
            "best of": {name: {n: best_of(loss[:, :n], score[:, :n]).mean().item() for n in counts}
                        for name, score in picks.items()},
            "argmax changed": {k: (ys[k].argmax(-1) != ys[k - 1].argmax(-1)).double().mean().item()
                               for k in range(1, len(ys))},
            "CE change": {k: step_ce[k] - step_ce[k - 1] for k in range(1, len(ys))},
            "examples": {"energy": flat(final_energy).tolist(), "CE": flat(loss).tolist()}}


def spearman(x, y):
    """Spearman's correlation of x and y (B, N, P) across the N candidates at each position: (B, P)."""
    def rank(t):
        i, j = t[:, :, None], t[:, None]  # [b, i, j, p]: candidate i against candidate j
        return (i < j).sum(1) + ((i == j).sum(1) - 1).double() / 2  # equal values share their mean rank
    rx, ry = (r - r.mean(1, keepdim=True) for r in (rank(x), rank(y)))
    return ((rx * ry).sum(1) / (rx.square().sum(1) * ry.square().sum(1)).sqrt()).nan_to_num(0.0)  # all equal: 0


def ppl_change(before, after):
    """Change of perplexity in percent from a change of cross-entropy (negative: better)."""
    return 100 * (math.exp(after - before) - 1)


def best_of(loss, score):
    """The loss (B, N, P) of the candidate scored lowest at each position, (B, P), ties sharing the pick:
    by final energy it is self-verification, by the loss a perfect verifier, by a constant a random pick."""
    score = score.nan_to_num(nan=math.inf)
    lowest = score == score.min(1, keepdim=True).values
    return (loss * lowest).sum(1) / lowest.sum(1)


def thinking_table(curves, trained_steps):
    """curves: {source name: thinking_curves(...)} -> perplexity against steps and candidates, a markdown table."""
    names = list(curves)
    rows = [[f"{k} {'step' if kind == 'steps' else 'candidate'}{'s' * (k > 1)}"
             + (" (trained)" if kind == "steps" and k == trained_steps else ""),
             *(f"{curves[n][kind][k]:.3f}" for n in names)]
            for kind in ("steps", "candidates") for k in curves[names[0]][kind]]
    return markdown_table([f"perplexity (lower is better; candidates at {trained_steps} steps)", *names], rows)


def verifier_table(curves):
    """curves: {source name: thinking_curves(...)} of an EBT -> what its energy knows of its candidates."""
    verifiers = [c["verifier"] for c in curves.values()]
    n = max(verifiers[0]["best of"]["energy"])
    rows = {"Spearman(final energy, CE)": lambda v: v["correlation"],
            "Spearman(final energy, entropy)": lambda v: v["entropy correlation"],
            **{f"CE, best of {n} {how}": lambda v, pick=pick: v["best of"][pick][n]
               for pick, how in (("energy", "by energy"), ("random", "at random"), ("oracle", "by CE (oracle)"))},
            **{f"argmax changed at step {k} (share)": lambda v, k=k: v["argmax changed"][k]
               for k in verifiers[0]["argmax changed"]}}
    return markdown_table(["self-verification", *curves],
                          [[label, *(f"{value(v):.3f}" for v in verifiers)] for label, value in rows.items()])


def markdown_table(head, rows):
    """head: the column names, rows: lists of cells (str) -> a markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def validation_and_ood(tokenizer, corpus, ood_text=None):
    """Token ids to evaluate thinking on: the validation split of the training corpus (data/prepare.py), and an
    out-of-distribution text less the characters a char tokenizer lacks (GPT-2 BPE lacks none). By default that
    text is the English documentation Python ships (pydoc_data.topics): out of distribution for a model trained on
    Shakespeare, on every machine, no download. Returns (val ids, OOD ids, characters dropped from the OOD text)."""
    if ood_text is None:
        from pydoc_data.topics import topics
        ood_text = "\n\n".join(topics[k] for k in sorted(topics))
    kept = ood_text
    if tokenizer.state()["kind"] == "char":
        kept = "".join(c for c in ood_text if c in tokenizer.index)
    return corpus.val, torch.tensor(tokenizer.encode(kept)), len(ood_text) - len(kept)


def training_corpus(ckpt_path, data=None):
    """The corpus a checkpoint was trained on: data, checked to be it, else the one it recorded (None: Shakespeare)."""
    from data import prepare
    ckpt = rundir.load_checkpoint(ckpt_path)
    corpus = prepare.corpus(data or (ckpt.get("data") or {}).get("path"), ckpt["tokenizer"]["kind"],
                            say=lambda line: print(line, file=sys.stderr))  # stdout is for the results
    corpus.check_trained_on(ckpt, ckpt_path, "pass that corpus with --data (another text goes in --ood)")
    return corpus
