"""
Generate text with a trained text EBT (or the Transformer++ baseline) and watch it think: the figures
are plots.py's, the measurements measure.py's.

    python sample.py --out_dir out-text --prompt "ROMEO:" --num_tokens 300
    python sample.py --steps 8 --candidates 4 --top_k 10    # think longer, keep the lowest-energy candidate
    python sample.py --steps 16 --tolerance 1e-3            # adaptive: stop a token once a step hardly lowers its energy
    python sample.py --plots plots/                         # 4 PNGs of the thinking behind the text
    python sample.py --eval --plots plots/                  # perplexity vs steps and candidates, val and OOD
"""
import cli  # first: a Ctrl-C while torch loads exits quietly
import sys
import time
from pathlib import Path

import torch

import compiled
import ebt
import measure
import plots
import rundir
from checks import SAMPLING_LIMITS
from data.text import read_text

PLOTS = {"energy_per_step": plots.plot_energy_per_step, "energy_landscape": plots.plot_energy_landscape,
         "distribution_sharpening": plots.plot_distribution_sharpening}
THINKING = ("steps", "step_size", "candidates", "langevin_std", "tolerance")  # ebt.generate's thinking options


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    s = p.add_argument
    s("--out_dir", default="out-text", help="directory holding ckpt.pt (default: %(default)s)")
    s("--ckpt", help="checkpoint file (default: OUT_DIR/best.pt, the lowest validation loss, else OUT_DIR/ckpt.pt)")
    s("--prompt", default="\n", help="text to continue (default: a newline)")
    s("--num_tokens", type=int, default=300, help="(default: %(default)s)")
    s("--temperature", type=float, default=1.0, help="0 = most likely token (default: %(default)s)")
    s("--top_k", type=int, help="sample among the k most likely tokens only")
    s("--seed", type=int, default=1337, help="of the sampling (--eval's windows and noise are fixed) (default: %(default)s)")
    cli.add_device_flag(p)
    s("--plots", help="save the thinking plots (or, with --eval, the evaluation plot) as PNGs in this directory; "
      "they think with --steps, the other thinking options apply to the sampled text")
    s("--compile", action="store_true", help="torch.compile an EBT's tokens (context, thinking, choice: one graph): "
      "3.6x the tokens/s on a CPU once compiled, but compiling takes 30-90 s, so it pays from a few thousand tokens")
    g = p.add_argument_group("thinking (EBT)")
    g.add_argument("--steps", type=int, help="thinking steps per token, may exceed training (default: as trained)")
    g.add_argument("--step_size", type=float, help="override the learned step size alpha")
    g.add_argument("--candidates", type=int, help="self-verification: think from N starts, keep the lowest energy")
    g.add_argument("--langevin_std", type=float, help="noise added to the logits before each step "
                   f"(default: {ebt.VERIFY_LANGEVIN_STD:g} with several candidates, the paper's, else 0)")
    g.add_argument("--tolerance", type=float, help="adaptive: stop a token once its energy falls by less than this")
    g.add_argument("--init_std", type=float, help="std of the random starting logits (default: as trained)")
    m = p.add_argument_group("other modes")
    m.add_argument("--eval", action="store_true", help="perplexity vs thinking steps and candidates on val and OOD text")
    m.add_argument("--data", help="--eval: the training corpus, a text file or a prepared folder, whose last 10%% is "
                   "the validation split (default: the checkpoint's own, recorded at training)")
    m.add_argument("--ood", help="--eval: out-of-distribution text file (default: Python's pydoc_data.topics)")
    m.add_argument("--windows", type=int, help="--eval: random windows of block_size tokens per text (default: 64)")
    args = p.parse_args(argv)
    cli.check_flags(args, {**SAMPLING_LIMITS, "windows": (int, 1, 10**6), "seed": (int, 0, ebt.MAX_SEED - 1)})
    if args.plots:
        rundir.check_out_dir(args.plots, "--plots")
    unread = [] if args.eval else [f"--{name}" for name in cli.given(args, ("data", "ood", "windows"))]
    if unread:  # an impossible value there would pass unseen
        print(f"warning: {', '.join(unread)} {'is' if len(unread) == 1 else 'are'} read only with --eval: ignored",
              file=sys.stderr)
    sampling = cli.given(args, (*THINKING, "top_k"))
    if args.eval and sampling:
        raise ebt.UsageError(f"--{next(iter(sampling))} applies to sampling; --eval sweeps thinking steps and "
                             "candidates itself, as trained")
    return args


def evaluate_thinking(model, tokenizer, corpus, args, ckpt):
    val, ood, dropped = measure.validation_and_ood(tokenizer, corpus, read_text(args.ood, "--ood") if args.ood else None)
    ood_name = Path(args.ood).name if args.ood else "pydoc_data.topics"
    print(f"OOD text {ood_name}: {len(ood)} tokens kept, {dropped} characters outside the vocabulary dropped")
    if dropped > 0.1 * (len(ood) + dropped):
        print(f"warning: {100 * dropped / (len(ood) + dropped):.0f}% of {ood_name} is outside the model's vocabulary "
              "and was dropped: its perplexity is of what is left", file=sys.stderr)
    trained = model.trained_steps() if isinstance(model, ebt.Thinker) else 1
    steps = sorted({1, 2, 3, *(k * trained for k in range(1, ebt.THINK_LONGER + 1))})
    sources = {"val": val, f"OOD: {ood_name}": ood}
    windows = args.windows or 64
    positions = windows * model.config.block_size
    scored = measure.energies_scored(positions, max(steps)) + measure.energies_scored(positions, trained, 8)
    with measure.progress(model, "evaluating", len(sources) * scored):  # 8: thinking_curves' most candidates
        curves = {name: measure.thinking_curves(model, ids, steps, windows=windows) for name, ids in sources.items()}
    print(measure.thinking_table(curves, trained))
    thinks = isinstance(model, ebt.TextEBT)
    if thinks:
        print(measure.verifier_table(curves))
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        thinking_curves = plots.sign(plots.plot_thinking_curves(curves, trained), ckpt)
        thinking_curves.savefig(Path(args.plots) / "thinking_curves.png", dpi=90)
        if thinks:
            plots.sign(plots.plot_verifier(curves), ckpt).savefig(Path(args.plots) / "verifier.png", dpi=90)
        print(f"saved {'thinking_curves.png and verifier.png' if thinks else 'thinking_curves.png'} in {args.plots}")


def generate_streamed(model, tokenizer, args, thinking):
    """generate(), printing each token's text as it comes; a token ending inside a character waits for the rest."""
    idx = torch.tensor([tokenizer.encode(args.prompt)], device=next(model.parameters()).device)
    print(tokenizer.decode(idx[0].tolist()), end="", flush=True)
    per_token = 1  # the Transformer++'s progress counts tokens
    if isinstance(model, ebt.TextEBT):  # an EBT's, the energies its thinking scores
        steps = thinking.get("steps") or model.trained_steps()
        per_token = measure.energies_scored(1, steps, thinking.get("candidates", 1), thinking.get("tolerance"))
    pending = []
    with measure.progress(model, "generating", args.num_tokens * per_token, by_energies=not args.compile) as shown:
        def on_token(new):
            pending.append(new[0, -1].item())
            text = tokenizer.decode(pending)
            if not text.endswith("\ufffd") or len(pending) == 4:  # a character takes at most 4 tokens of bytes
                print(text, end="", flush=True)
                pending.clear()
            shown.advance((new.shape[1] - idx.shape[1]) * per_token - shown.done)  # adaptive: may have stopped early
        out = ebt.generate(model, idx, args.num_tokens, args.temperature, args.top_k,
                           torch.Generator().manual_seed(args.seed), on_token=on_token, **thinking)
    print(tokenizer.decode(pending), flush=True)
    return out


def main(argv=None):
    args = parse_args(argv)
    device = cli.pick_device(args.device)
    torch.manual_seed(args.seed)
    best = Path(args.out_dir) / "best.pt"  # the run at its lowest validation loss, else its last checkpoint
    ckpt = args.ckpt or (best if best.exists() else Path(args.out_dir) / "ckpt.pt")
    model, tokenizer = rundir.load_text_model(ckpt, device, **cli.given(args, ("init_std",)))
    if args.compile:
        compiled.compile_model(model)
        print("compiling: the first tokens take 30-90 s", file=sys.stderr, flush=True)
    if args.eval:
        return evaluate_thinking(model, tokenizer, measure.training_corpus(ckpt, args.data), args, ckpt)
    if args.plots:
        rundir.require_ebt(model, "--plots")
    t0 = time.time()
    out = generate_streamed(model, tokenizer, args, cli.given(args, THINKING))
    text = tokenizer.decode(out.idx[0].tolist())
    summary = f"{args.num_tokens} tokens in {time.time() - t0:.1f}s from {ckpt}"
    if out.energy is not None and args.num_tokens:
        summary += (f" | final energy mean {out.energy.mean():.3f} (max {out.energy.max():.3f})"
                    f" | steps used mean {out.steps_used.float().mean():.2f} (max {out.steps_used.max()})")
    print(summary, file=sys.stderr)
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        figures = {name: plot(model, tokenizer, text[-65:], steps=args.steps, seed=args.seed)[0]  # readable labels
                   for name, plot in PLOTS.items()}
        if args.num_tokens:
            figures["generation"] = plots.plot_generation(model, out)[0]
        for name, fig in figures.items():
            plots.sign(fig, ckpt).savefig(Path(args.plots) / f"{name}.png", dpi=90)
        print(f"saved {len(figures)} plots in {args.plots}", file=sys.stderr)


if __name__ == "__main__":
    cli.invoke(main)
