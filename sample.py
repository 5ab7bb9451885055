"""
Generate text with a trained text EBT (or the Transformer++ baseline) and watch it think.

    python sample.py --out_dir out-text --prompt "ROMEO:" --num_tokens 300
    python sample.py --steps 8 --candidates 4 --top_k 10    # think longer, keep the lowest-energy candidate
    python sample.py --steps 16 --tolerance 1e-3            # adaptive: stop a token once its energy settles
    python sample.py --plots plots/                         # 4 PNGs of the thinking behind the text
    python sample.py --eval --plots plots/                  # perplexity vs steps and candidates, val and OOD
"""
import sys
import time
from pathlib import Path

import torch

import ebt

PLOTS = {"energy_per_step": ebt.plot_energy_per_step, "energy_heatmap": ebt.plot_energy_heatmap,
         "energy_landscape": ebt.plot_energy_landscape, "distribution_sharpening": ebt.plot_distribution_sharpening}
# plus generation.png: the energy of every generated token while it was thought about


def parse_args(argv=None):
    p = ebt.ArgumentParser(description=__doc__)
    s = p.add_argument
    s("--out_dir", default="out-text", help="directory holding ckpt.pt (default: %(default)s)")
    s("--ckpt", help="checkpoint file (default: OUT_DIR/ckpt.pt)")
    s("--prompt", default="\n", help="text to continue (default: a newline)")
    s("--num_tokens", type=int, default=300, help="(default: %(default)s)")
    s("--temperature", type=float, default=1.0, help="0 = most likely token (default: %(default)s)")
    s("--top_k", type=int, help="sample among the k most likely tokens only")
    s("--seed", type=int, default=1337, help="(default: %(default)s)")
    s("--device", default="auto", help="auto, cpu, cuda or mps (default: %(default)s)")
    s("--plots", help="save the thinking plots (or, with --eval, the evaluation plot) as PNGs in this directory")
    g = p.add_argument_group("thinking (EBT)")
    g.add_argument("--steps", type=int, help="thinking steps per token, may exceed training (default: as trained)")
    g.add_argument("--step_size", type=float, help="override the learned step size alpha")
    g.add_argument("--candidates", type=int, help="self-verification: think from N starts, keep the lowest energy")
    g.add_argument("--langevin_std", type=float, help="noise added to the logits before each step "
                   "(default: 1 with several candidates, the paper's, else 0)")
    g.add_argument("--tolerance", type=float, help="adaptive: stop a token once its energy falls by less than this")
    g.add_argument("--init_std", type=float, help="std of the random starting logits (default: as trained)")
    m = p.add_argument_group("other modes")
    m.add_argument("--eval", action="store_true", help="perplexity vs thinking steps and candidates on val and OOD text")
    m.add_argument("--data", help="--eval: the training text, whose last 10%% is the validation split (default: Tiny Shakespeare, shipped)")
    m.add_argument("--ood", help="--eval: out-of-distribution text file (default: Python's pydoc_data.topics)")
    m.add_argument("--windows", type=int, default=64, help="--eval: random windows of block_size tokens per text (default: %(default)s)")
    args = p.parse_args(argv)
    positive, at_least = (lambda v: v > 0), (lambda n: lambda v: v >= n)
    for name, ok, what in (("num_tokens", at_least(0), ">= 0"), ("temperature", at_least(0), "finite and >= 0"),
                           ("top_k", at_least(1), ">= 1"), ("steps", lambda v: 1 <= v <= 10_000, "in 1..10000"),
                           ("step_size", positive, "finite and > 0"), ("candidates", at_least(1), ">= 1"),
                           ("langevin_std", at_least(0), "finite and >= 0"), ("tolerance", at_least(0), "finite and >= 0"),
                           ("init_std", at_least(0), "finite and >= 0"), ("windows", at_least(1), ">= 1")):
        ebt.check_flag(getattr(args, name), name, lambda v: ok(v) and abs(v) != float("inf"), what)
    return args


def evaluate_thinking(model, tokenizer, args):
    val, ood, dropped = ebt.validation_and_ood(tokenizer, model.config.block_size, ebt.text_or_shakespeare(args.data),
                                               ebt.read_text(args.ood) if args.ood else None)
    ood_name = Path(args.ood).name if args.ood else "pydoc_data.topics"
    print(f"OOD text {ood_name}: {len(ood)} tokens kept, {dropped} characters outside the vocabulary dropped")
    trained = model.trained_steps() if getattr(model, "thinks", False) else 1
    steps = sorted({1, 2, 3, trained, 2 * trained, 3 * trained, 4 * trained})
    sources = {"val": val, f"OOD: {ood_name}": ood}
    results = {name: ebt.thinking_curves(model, ids, steps, windows=args.windows) for name, ids in sources.items()}
    print(ebt.thinking_table(results, trained))
    if args.plots:
        path = Path(args.plots) / "thinking_curves.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        ebt.plot_thinking_curves(results, trained).savefig(path, dpi=90)
        print(f"saved {path}")


def main(argv=None):
    args = parse_args(argv)
    device = ebt.pick_device(args.device)
    torch.manual_seed(args.seed)
    ckpt = args.ckpt or Path(args.out_dir) / "ckpt.pt"
    thinking = {k: getattr(args, k) for k in ("steps", "step_size", "candidates", "langevin_std", "tolerance")
                if getattr(args, k) is not None}
    overrides = {} if args.init_std is None else {"init_std": args.init_std}
    model, tokenizer = ebt.text_model_from_checkpoint(ckpt, device, **overrides)
    if args.eval:
        return evaluate_thinking(model, tokenizer, args)
    if args.plots:
        ebt.require_ebt(model, "--plots")
    idx = torch.tensor([tokenizer.encode(args.prompt)], device=device)
    t0 = time.time()
    out = ebt.generate(model, idx, args.num_tokens, args.temperature, args.top_k,
                       torch.Generator().manual_seed(args.seed), **thinking)
    text = tokenizer.decode(out.idx[0].tolist())
    print(text)
    summary = f"{args.num_tokens} tokens in {time.time() - t0:.1f}s"
    if out.energy is not None and args.num_tokens:
        summary += (f" | final energy mean {out.energy.mean():.3f} (max {out.energy.max():.3f})"
                    f" | steps used mean {out.steps_used.float().mean():.2f} (max {out.steps_used.max()})")
    print(summary, file=sys.stderr)
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        for name, plot in PLOTS.items():  # the last 64 characters: readable labels
            fig, _ = plot(model, tokenizer, text[-65:], steps=args.steps, seed=args.seed)
            fig.savefig(Path(args.plots) / f"{name}.png", dpi=90)
        if args.num_tokens:
            ebt.plot_generation(model, out)[0].savefig(Path(args.plots) / "generation.png", dpi=90)
        print(f"saved {len(PLOTS) + bool(args.num_tokens)} plots in {args.plots}", file=sys.stderr)


if __name__ == "__main__":
    ebt.run_cli(main)
