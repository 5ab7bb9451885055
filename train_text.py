"""
Train a text EBT (or the Transformer++ baseline) on Tiny Shakespeare (shipped) or any text file.

    python train_text.py                        # EBT, recipe S1; preset from the device (gpu, else cpu)
    python train_text.py --recipe s2            # the paper's System 2 recipe
    python train_text.py --model transformer    # the baseline, same backbone and batch, in out-text-transformer/
    python train_text.py --data my.txt --tokenizer gpt2
    python train_text.py --resume               # continue out-text/ckpt.pt with its own settings

Measured (README "On one GPU", an earlier version: memory is lower now): the default command
on one H100 trains at 117k tokens/s, 0.15 s a step, 7.4 GB peak; the 5000 steps take about 13 minutes (the Transformer++: 1.19M
tokens/s, 1.3 GB, 1.4 minutes); the validation loss is lowest near step 500 (1.61; the
Transformer++ 1.53), both overfit after. On 2 CPU cores the cpu preset takes about 6 minutes.

Recipes (the paper's job scripts, every value overridable by its flag):
  s1  2 steps, one step embedding each, alpha learned (lr x 3 alpha, no decay), mean CE over steps
  s2  one landscape descended 2 or 3 times (3 at evaluation), alpha 5 fixed, per-token alpha in
      [alpha/2, 2 alpha], Langevin noise 3, no detach, last step trained only, replay buffer of 192
"""
import argparse

import ebt

PRESETS = {  # sizes and budgets; every entry can be overridden by its flag
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, max_steps=5000,
                lr=1e-3, eval_interval=250, eval_batches=20, log_interval=10),
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=16, max_steps=1500,
                lr=2e-3, eval_interval=250, eval_batches=10, log_interval=25),
}


def s1_step_size(vocab_size):
    """S1's alpha: 0.25 sqrt(V), measured best of a sweep at V = 65 (2) and near the best at 50,257
    (56; 50 was best of 2, 50, 500), README "Choosing alpha". The paper's 500 was tuned at 50,277."""
    return round(0.25 * vocab_size ** 0.5, 1)


RECIPES = {
    "s1": dict(think_steps=2, landscapes=None, random_steps=0, step_size=None, learn_step_size=True, langevin_std=0.0,
               random_step_size=1.0, truncate=False, detach=True, replay_size=0),
    "s2": dict(think_steps=2, landscapes=1, random_steps=1, step_size=5.0, learn_step_size=False, langevin_std=3.0,
               random_step_size=2.0, truncate=True, detach=False, replay_size=192),
}
MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "mlp_hidden", "block_size", *RECIPES["s1"], "step_size_lr_mult",
               "init_std", "replay_batch")
TRAIN_FLAGS = ("batch_size", "max_steps", "lr", "warmup_steps", "grad_accum", "weight_decay", "grad_clip",
               "eval_interval", "eval_batches", "eval_steps", "log_interval", "seed")
EBT_FLAGS = ("recipe", *RECIPES["s1"], "step_size_lr_mult", "init_std", "replay_batch", "eval_steps")  # thinking


def parse_args(argv=None):
    # every default is None here, so what the user typed is known: resuming keeps the rest
    p = ebt.ArgumentParser(description=__doc__)
    m, t, s = ebt.ModelConfig(), ebt.TrainConfig(), p.add_argument
    preset_help = lambda k: f"(default: from --preset: gpu {PRESETS['gpu'][k]}, cpu {PRESETS['cpu'][k]})"
    recipe_help = lambda k: f"(default: from --recipe: s1 {RECIPES['s1'][k]}, s2 {RECIPES['s2'][k]})"
    s("--preset", choices=PRESETS, help="size and budget (default: gpu when --device is or picks cuda or mps, else cpu)")
    s("--model", choices=ebt.TEXT_KINDS, help="(default: ebt)")
    s("--recipe", choices=RECIPES, help="the paper's training recipe for the EBT (default: s1)")
    for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_steps", "eval_interval",
              "eval_batches", "log_interval"):
        s(f"--{k}", type=int, help=preset_help(k))
    s("--lr", type=float, help=preset_help("lr"))
    s("--mlp_hidden", type=int, help="SwiGLU hidden width, 0 = n_embd as in the paper's models (default: 0)")
    s("--warmup_steps", type=int, help=f"(default: {t.warmup_steps})")
    s("--grad_accum", type=int, help=f"micro-batches per optimizer step (default: {t.grad_accum})")
    s("--weight_decay", type=float, help=f"(default: {t.weight_decay})")
    s("--grad_clip", type=float, help=f"0 = off (default: {t.grad_clip})")
    g = p.add_argument_group("thinking (EBT)")
    g.add_argument("--think_steps", type=int, help="descent steps in training " + recipe_help("think_steps"))
    g.add_argument("--random_steps", type=int, help="train with think_steps + U{0..n} steps " + recipe_help("random_steps"))
    g.add_argument("--landscapes", type=int, help="step embeddings; step k uses min(k, n-1) "
                   "(default: from --recipe: s1 think_steps, s2 1)")
    g.add_argument("--step_size", type=float, help="alpha (default: s1 0.25 sqrt(vocabulary), 2 for characters; s2 5)")
    g.add_argument("--learn_step_size", action=argparse.BooleanOptionalAction, help=recipe_help("learn_step_size"))
    g.add_argument("--step_size_lr_mult", type=float, help="alpha's lr / base lr (default: 3 x step_size, the paper's 1500 at 500)")
    g.add_argument("--init_std", type=float, help=f"thinking starts from N(0, init_std^2) logits (default: {m.init_std})")
    g.add_argument("--eval_steps", type=int, help="thinking steps at evaluation, 0 = 2x the trained steps (default: 0)")
    g.add_argument("--langevin_std", type=float, help="noise added to the logits before each step " + recipe_help("langevin_std"))
    g.add_argument("--random_step_size", type=float, help="per-token alpha in [alpha/s, alpha*s], 1 = off " + recipe_help("random_step_size"))
    g.add_argument("--truncate", action=argparse.BooleanOptionalAction, help="train the last step only " + recipe_help("truncate"))
    g.add_argument("--detach", action=argparse.BooleanOptionalAction, help="cut the graph between steps " + recipe_help("detach"))
    g.add_argument("--replay_size", type=int, help="replay buffer, sequences kept, 0 = off " + recipe_help("replay_size"))
    g.add_argument("--replay_batch", type=float, help=f"replayed sequences per batch, a fraction of it (default: {m.replay_batch})")
    s("--data", help="text file to train on (default: Tiny Shakespeare, shipped in data/)")
    s("--tokenizer", choices=("char", "gpt2"), help="(default: char)")
    s("--vocab_size", type=int, help="pad the vocabulary to this many ids; the extra ones never occur "
      "(default: the tokenizer's; measures what a large vocabulary costs without its data)")
    s("--out_dir", help="checkpoint, metrics.jsonl and loss.png go here (default: out-text, for the Transformer++ "
      "out-text-transformer)")
    s("--resume", action="store_true", help="continue from out_dir/ckpt.pt with its settings; flags given override")
    s("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps (default: %(default)s)")
    s("--seed", type=int, help=f"fixes the initial weights, batches and noise (default: {t.seed})")
    s("--compile", action="store_true", help="torch.compile the Transformer++, or the EBT's context stream and "
      "its thinking at evaluation (training's thinking stays eager: see README \"Speed and memory\")")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or ("out-text-transformer" if args.model == "transformer" else "out-text")
    return args


def refuse_thinking_flags(args, model):
    """An EBT option given for a model that does not think is an error, not silently dropped."""
    thinking = ebt.given_flags(args, EBT_FLAGS)
    if model != "ebt" and thinking:
        raise ebt.UsageError(f"--{next(iter(thinking))} is an EBT option; the {model} model does not think")


def new_run(args, device, text, log):
    """Model and training configs of a fresh run: flags, then recipe, then preset, then defaults."""
    preset = args.preset or ("cpu" if device == "cpu" else "gpu")
    log(f"preset {preset}" + ("" if args.preset else f" (chosen for device {device}; --preset to change)"))
    if preset == "gpu" and device == "cpu":
        log("warning: the gpu preset on a CPU takes hours and may not fit in memory; --preset cpu is sized for it")
    model, recipe = args.model or "ebt", args.recipe or "s1"
    refuse_thinking_flags(args, model)
    tokenizer = ebt.CharTokenizer.fit(text) if (args.tokenizer or "char") == "char" else ebt.GPT2Tokenizer()
    values = {**PRESETS[preset], **(RECIPES[recipe] if model == "ebt" else {}),
              **ebt.given_flags(args, MODEL_FLAGS + TRAIN_FLAGS)}
    if model == "ebt":
        if values.get("landscapes") is None:  # S1: one per step
            values["landscapes"] = values["think_steps"]
        if values.get("step_size") is None:
            values["step_size"] = s1_step_size(args.vocab_size or tokenizer.vocab_size)
        values.setdefault("step_size_lr_mult", 3 * values["step_size"])
    vocab_size = args.vocab_size or tokenizer.vocab_size
    if vocab_size < tokenizer.vocab_size:
        raise ebt.UsageError(f"--vocab_size {vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    cfg = ebt.ModelConfig(model=model, vocab_size=vocab_size, **{k: v for k, v in values.items() if k in MODEL_FLAGS})
    tc = ebt.TrainConfig(**{k: v for k, v in values.items() if k in TRAIN_FLAGS})
    return cfg, tc, tokenizer, {"preset": preset, "recipe": recipe if model == "ebt" else None}


def resumed_run(args, ckpt, log):
    """The checkpoint's own configs; training flags given override them, model flags (and the
    preset and recipe it started from) must agree."""
    started = ckpt.get("started", {})
    refuse_thinking_flags(args, ckpt["model_config"]["model"])
    for k, v in ebt.given_flags(args, ("preset", "recipe")).items():
        if started.get(k, v) != v:
            raise ebt.UsageError(f"--{k} {v}: the run in {args.out_dir} started from {k} {started[k]}; resume "
                                 "without it, or start a new run in another --out_dir")
    cfg = ebt.ModelConfig.from_dict(ckpt["model_config"])
    for k, v in ebt.given_flags(args, MODEL_FLAGS + ("model", "vocab_size")).items():
        if getattr(cfg, k) != v:
            raise ebt.UsageError(f"--{k} {v} conflicts with the checkpoint's {getattr(cfg, k)}; "
                                 "resume without it, or start a new run in another --out_dir")
    if args.tokenizer and args.tokenizer != ckpt["tokenizer"]["kind"]:
        raise ebt.UsageError(f"--tokenizer {args.tokenizer} conflicts with the checkpoint's "
                             f"{ckpt['tokenizer']['kind']}; resume without it or use another --out_dir")
    train = {k: v for k, v in ckpt["train_config"].items() if k in TRAIN_FLAGS}
    for k, v in ebt.given_flags(args, TRAIN_FLAGS).items():
        if train[k] != v:
            log(f"notice: --{k} {v} overrides the checkpoint's {train[k]}")
            train[k] = v
    return cfg, ebt.TrainConfig(**train), ebt.tokenizer_from_state(ckpt["tokenizer"]), started


def main(argv=None, log=None):
    log = log or (lambda *a: print(*a, flush=True))
    args = parse_args(argv)
    device = ebt.pick_device(args.device)
    ckpt = ebt.load_checkpoint(f"{args.out_dir}/ckpt.pt") if args.resume else None
    data_path = args.data if args.data or not ckpt else ckpt["data"]["path"]
    text = ebt.text_or_shakespeare(data_path)
    if ckpt:
        if ebt.sha256_text(text) != ckpt["data"]["sha256"]:
            raise ebt.UsageError(f"{data_path or 'the data'} is not the text {args.out_dir}/ckpt.pt was trained on "
                                 "(checksum); resume with the same --data or start a new --out_dir")
        cfg, tc, tokenizer, started = resumed_run(args, ckpt, log)
    else:
        cfg, tc, tokenizer, started = new_run(args, device, text, log)
    tc.out_dir, tc.device = args.out_dir, args.device
    tc.compile = args.compile or bool(ckpt and ckpt["train_config"].get("compile"))
    data = ebt.TextData(tokenizer.encode(text), cfg.block_size, source=data_path or "Tiny Shakespeare")
    meta = {"tokenizer": tokenizer.state(), "data": {"path": data_path, "sha256": ebt.sha256_text(text)},
            "started": started}
    ebt.train(ebt.build_model(cfg, tc.seed), data, tc, meta=meta, resume=bool(ckpt), log=log)


if __name__ == "__main__":
    ebt.run_cli(main)
