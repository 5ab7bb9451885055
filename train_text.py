"""
Train a text EBT (or the Transformer++ baseline) on Tiny Shakespeare or any text file.

    python train_text.py                               # EBT, sized for one GPU
    python train_text.py --preset cpu                  # a few minutes on a laptop CPU
    python train_text.py --model transformer           # the baseline, same backbone and batch
    python train_text.py --data my.txt --tokenizer gpt2
    python train_text.py --resume                      # continue out-text/ckpt.pt
"""
import argparse

import ebt

PRESETS = {  # sizes and budgets; every entry can be overridden by its flag
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, max_steps=5000,
                lr=1e-3, eval_interval=250, eval_batches=20, log_interval=10),
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=16, max_steps=1500,
                lr=2e-3, eval_interval=250, eval_batches=10, log_interval=25),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m, t, s = ebt.ModelConfig(), ebt.TrainConfig(), p.add_argument
    preset_help = lambda k: f"(default: from --preset, gpu {PRESETS['gpu'][k]}, cpu {PRESETS['cpu'][k]})"
    s("--preset", choices=PRESETS, default="gpu", help="size and budget (default: %(default)s)")
    s("--model", choices=ebt.TEXT_KINDS, default="ebt", help="(default: %(default)s)")
    for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_steps", "eval_interval",
              "eval_batches", "log_interval"):
        s(f"--{k}", type=int, help=preset_help(k))
    s("--lr", type=float, help=preset_help("lr"))
    s("--warmup_steps", type=int, default=t.warmup_steps, help="(default: %(default)s)")
    s("--grad_accum", type=int, default=t.grad_accum, help="micro-batches per optimizer step (default: %(default)s)")
    s("--weight_decay", type=float, default=t.weight_decay, help="(default: %(default)s)")
    s("--grad_clip", type=float, default=t.grad_clip, help="0 = off (default: %(default)s)")
    g = p.add_argument_group("thinking (EBT)")
    g.add_argument("--think_steps", type=int, default=m.think_steps, help="descent steps in training (default: %(default)s)")
    g.add_argument("--step_size", type=float, default=m.step_size, help="initial step size alpha (default: %(default)s)")
    g.add_argument("--step_size_lr_mult", type=float, default=m.step_size_lr_mult, help="alpha's lr / base lr (default: %(default)s)")
    g.add_argument("--init_std", type=float, default=m.init_std, help="std of the starting logits at inference (default: %(default)s)")
    g.add_argument("--train_init_std", type=float, default=m.train_init_std, help="std of the starting logits in training (default: %(default)s)")
    g.add_argument("--random_init_std", action=argparse.BooleanOptionalAction, default=m.random_init_std,
                   help="draw each training sequence's start std from U[0, train_init_std] (default: %(default)s)")
    g.add_argument("--eval_steps", type=int, default=t.eval_steps, help="thinking steps at evaluation, 0 = 2x think_steps (default: %(default)s)")
    g.add_argument("--langevin_std", type=float, default=m.langevin_std, help="System 2: noise added before each step (default: %(default)s)")
    g.add_argument("--random_step_size", type=float, default=m.random_step_size, help="System 2: per-sample alpha in [alpha/s, alpha*s], 1 = off (default: %(default)s)")
    g.add_argument("--random_steps", type=int, default=m.random_steps, help="System 2: add U{0..n} training steps (default: %(default)s)")
    g.add_argument("--truncate", action="store_true", help="System 2: only the last step keeps the second-order graph")
    g.add_argument("--no_detach", action="store_true", help="System 2: backprop through the whole descent path")
    s("--data", help="text file to train on (default: Tiny Shakespeare, downloaded once and cached)")
    s("--tokenizer", choices=("char", "gpt2"), default="char", help="(default: %(default)s)")
    s("--out_dir", default="out-text", help="checkpoint, metrics.jsonl and loss.png go here (default: %(default)s)")
    s("--resume", action="store_true", help="continue from out_dir/ckpt.pt")
    s("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps (default: %(default)s)")
    s("--seed", type=int, default=t.seed, help="(default: %(default)s)")
    s("--compile", action="store_true", help="torch.compile the Transformer++, or the EBT's context stream "
      "(torch.compile has no double backward, so the prediction stream stays eager)")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None):
    args = parse_args(argv)
    tc = ebt.TrainConfig(max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                         grad_clip=args.grad_clip, eval_interval=args.eval_interval, eval_batches=args.eval_batches,
                         eval_steps=args.eval_steps, log_interval=args.log_interval, out_dir=args.out_dir,
                         device=args.device, seed=args.seed, compile=args.compile)
    ckpt = ebt.resume_checkpoint(args.out_dir, args.model) if args.resume else None
    if ckpt:
        tokenizer = ebt.tokenizer_from_state(ckpt["tokenizer"])
        cfg = ebt.ModelConfig.from_dict(ckpt["model_config"])
    text = ebt.text_or_shakespeare(args.data)
    if not ckpt:
        tokenizer = ebt.CharTokenizer.fit(text) if args.tokenizer == "char" else ebt.GPT2Tokenizer()
        cfg = ebt.ModelConfig(
            model=args.model, vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
            n_head=args.n_head, n_embd=args.n_embd, think_steps=args.think_steps, step_size=args.step_size,
            step_size_lr_mult=args.step_size_lr_mult, init_std=args.init_std, train_init_std=args.train_init_std,
            random_init_std=args.random_init_std, langevin_std=args.langevin_std,
            random_step_size=args.random_step_size, random_steps=args.random_steps, truncate=args.truncate,
            detach=not args.no_detach)
    data = ebt.TextData(tokenizer.encode(text), cfg.block_size, source=args.data or "Tiny Shakespeare")
    ebt.train(ebt.build_model(cfg, args.seed), data, tc, meta={"tokenizer": tokenizer.state()}, resume=bool(ckpt))


if __name__ == "__main__":
    ebt.run_cli(main)
