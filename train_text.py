"""
Train a text EBT (or the Transformer++ baseline) on Tiny Shakespeare (shipped) or a corpus of your own.

    python train_text.py --preset quick         # a first look: about a minute on 2 cores, into out-text-quick/
    python train_text.py                        # EBT, recipe S1; preset from the device (gpu, else cpu)
    python train_text.py --recipe s2            # the paper's System 2 recipe
    python train_text.py --model transformer    # the baseline, same backbone and batch, in out-text-transformer/
    python train_text.py --data my.txt --tokenizer gpt2   # prepared into data/cache/ on first use
    python data/prepare.py "books/*.txt" --out_dir data/books && python train_text.py --data data/books
    python train_text.py --resume               # continue out-text/ckpt.pt with its own settings

The recipes, s1 and s2, are the paper's (ebt.RECIPES); every value they set can be overridden by its flag.
"""
import cli
import compiled
import ebt
import rundir
from data import prepare
from data.text import TextData, tokenizer_from_state

PRESETS = {  # sizes and budgets; every entry can be overridden by its flag
    # gpu: an H100 run of 5000 steps had its lowest validation loss near step 500 and overfit after
    # (assets/speed.md, "On one GPU"); best.pt keeps the lowest of any run
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, max_steps=1000,
                lr=1e-3, eval_interval=100, eval_batches=20, log_interval=10),
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=16, max_steps=1500,
                lr=2e-3, eval_interval=250, eval_batches=10, log_interval=25),
    "quick": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=16, max_steps=500,
                  lr=3e-3, eval_interval=250, eval_batches=5, log_interval=50),  # words, and a thinking log
}
MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "mlp_hidden", "vocab_size")
TRAIN_FLAGS = ("max_steps", "batch_size", "grad_accum", "lr", "warmup_steps", "weight_decay", "grad_clip",
               "eval_interval", "eval_batches", "log_interval", "seed", "compile")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    s = p.add_argument
    s("--preset", choices=PRESETS, help="size and budget (default: gpu when --device is or picks cuda or mps, else cpu)")
    s("--model", choices=ebt.TEXT_KINDS, help="the EBT, or the Transformer++ baseline (default: ebt)")
    s("--recipe", choices=ebt.RECIPES, help="the paper's training recipe for the EBT (default: s1)")
    preset = {k: "from --preset: " + ", ".join(f"{name} {p[k]}" for name, p in PRESETS.items()) for k in PRESETS["cpu"]}
    cli.add_flags(p, ebt.ModelConfig, MODEL_FLAGS, {**preset, "vocab_size": "the tokenizer's"})
    cli.add_flags(p, ebt.TrainConfig, TRAIN_FLAGS, preset)
    recipe = {k: f"from --recipe: s1 {ebt.RECIPES['s1'][k]}, s2 {ebt.RECIPES['s2'][k]}" for k in ebt.RECIPES["s1"]}
    recipe.update(landscapes="s1 think_steps, s2 1", step_size="s1 0.25 sqrt(vocabulary), s2 5",
                  step_size_lr_mult="3 x step_size")  # ebt.derive_thinking
    thinking = p.add_argument_group("thinking (EBT)")
    cli.add_flags(thinking, ebt.ModelConfig, cli.THINKING_FLAGS, recipe)
    cli.add_flags(thinking, ebt.TrainConfig, ("eval_steps",))
    s("--data", help="a text file (prepared into data/cache/ on first use), or a folder prepared by data/prepare.py "
      "(default: Tiny Shakespeare, shipped in data/)")
    s("--tokenizer", choices=("char", "gpt2"), help="for a text file (default: char; a prepared folder has its own)")
    s("--out_dir", help="checkpoint, metrics.jsonl and loss.png (default: out-text, with -transformer for the "
      "Transformer++ and -quick for --preset quick)")
    s("--resume", action="store_true", help="continue from out_dir/ckpt.pt with its settings; flags given override "
      "its training settings and must agree with the rest")
    cli.add_device_flag(p)
    args = p.parse_args(argv)
    suffix = ("-transformer" if args.model == "transformer" else "") + ("-quick" if args.preset == "quick" else "")
    args.out_dir = args.out_dir or "out-text" + suffix
    return args


def main(argv=None, log=rundir.print_flushed):
    args = parse_args(argv)
    device = rundir.join_process_group(cli.pick_device(args.device))  # under torchrun the ranks own out_dir as one
    with rundir.lock_out_dir(args.out_dir, args.resume):  # a second run into out_dir refuses while this one runs
        run_training(args, device, log)


def run_training(args, device, log):
    ckpt = rundir.checkpoint_to_resume(args.out_dir, ebt.TEXT_KINDS) if args.resume else None
    model = ckpt["model_config"]["model"] if ckpt else args.model or "ebt"
    cli.refuse_thinking(args, model)
    preset = args.preset or ("cpu" if device == "cpu" else "gpu")
    if not ckpt:  # named first: preparing a corpus may take a while
        log(f"preset {preset}" + ("" if args.preset else f" (chosen for device {device}; --preset to change)"))
        if preset == "gpu" and device == "cpu":
            log("warning: the gpu preset on a CPU takes hours and may not fit in memory; --preset cpu is sized for it")
    path = args.data or (ckpt["data"]["path"] if ckpt else None)
    corpus = prepare.corpus(path, (ckpt.get("started") or {}).get("tokenizer") if ckpt else args.tokenizer, say=log)
    if ckpt:
        corpus.check_trained_on(ckpt, f"{args.out_dir}/ckpt.pt", "resume with the same --data or start a new --out_dir")
    started = ckpt.get("started", {}) if ckpt else {
        "preset": preset, "recipe": args.recipe or "s1"
        if model in ebt.EBT_KINDS else None, "tokenizer": corpus.meta["tokenizer"]["kind"]}
    tokenizer = tokenizer_from_state(ckpt["tokenizer"]) if ckpt else corpus.tokenizer
    if args.vocab_size is not None and args.vocab_size < tokenizer.vocab_size:
        raise ebt.UsageError(f"--vocab_size {args.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    if args.vocab_size is not None and args.vocab_size > tokenizer.vocab_size:
        log(f"warning: --vocab_size {args.vocab_size} pads the tokenizer's {tokenizer.vocab_size}: ids "
            f"{tokenizer.vocab_size}.. never occur in the data")
    if tokenizer.vocab_size == 1:
        log(f"warning: {path or 'the corpus'} holds one distinct token: there is nothing to predict")

    layers = [] if ckpt else [PRESETS[started["preset"]], ebt.RECIPES[started["recipe"]] if model in ebt.EBT_KINDS else {},
                              {"model": model, "vocab_size": tokenizer.vocab_size}]
    cfg, tc = cli.configs(args, layers, ckpt, log)
    rundir.check_fits(cfg, tc.batch_size, device, tc.compile)
    tc.out_dir, tc.device = args.out_dir, device
    data = TextData(corpus.train, corpus.val, cfg.block_size, source=path or "Tiny Shakespeare")
    meta = {"tokenizer": tokenizer.state(), "data": {"path": path, "id": corpus.id}, "started": started}
    model = ebt.build_model(cfg, tc.seed)
    if tc.compile:
        compiled.compile_model(model)
    ebt.train(model, data, tc, rundir.Run(tc.out_dir, meta, resume=bool(ckpt), say=log))


if __name__ == "__main__":
    cli.invoke(main)
