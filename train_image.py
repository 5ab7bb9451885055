"""
Train an image denoising EBT, or one of its baselines on the same transformer, and compare them.

    python train_image.py --model ebt                  # photographs, tested on others; recipe S1
    python train_image.py --model ebt --recipe s2 --out_dir out-image-ebt-s2
    python train_image.py --model dit                  # Diffusion Transformer: predicts the noise, DDIM
    python train_image.py --model regressor            # one forward pass to the clean image
    python train_image.py --compare out-image-ebt out-image-ebt-s2 out-image-dit out-image-regressor
    python train_image.py --dataset grace_hopper       # matplotlib's one photograph (no scikit-image)
    python train_image.py --dataset mnist              # or cifar10: downloaded once and cached
    python train_image.py --data my_photos/            # a folder of PNG / JPEG files

The data, the noise and the report it writes: assets/images.md.
"""
import cli  # first: a Ctrl-C while torch loads exits quietly
from pathlib import Path

import torch

import ebt
import image_models
import measure
import plots
import rundir
from checks import UsageError
from data import images

REPORT_CROPS = 128  # validation crops behind every number in the report
GRID_CROPS = 4      # rows of grid.png: the report crops with the most detail (pixel std)
DIT_PASSES = (1, 3, 10, 30, 100)
DEFAULTS = dict(patch_size=4, n_layer=3, n_head=4, n_embd=96, max_steps=800, batch_size=32, lr=1e-3,
                warmup_steps=50, eval_interval=200, eval_batches=4, log_interval=20)
MODEL_FLAGS = ("image_size", "patch_size", "n_layer", "n_head", "n_embd", "noise_t")
TRAIN_FLAGS = ("max_steps", "batch_size", "lr", "warmup_steps", "weight_decay", "grad_clip", "eval_interval",
               "eval_batches", "log_interval", "seed")


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__)
    s = p.add_argument
    s("--model", choices=("ebt", "dit", "regressor"), help="(default: ebt)")
    s("--recipe", choices=ebt.IMAGE_RECIPES, help="the EBT's (default: s1)")
    s("--compare", nargs="+", metavar="OUT_DIR", help="report on trained checkpoints instead of training")
    s("--dataset", choices=("photos", "grace_hopper", "mnist", "cifar10"),
      help=f"photos: train on {', '.join(images.PHOTOS['train'])}, test on {', '.join(images.PHOTOS['test'])} (needs "
      "scikit-image); grace_hopper: matplotlib's one photograph, bottom fifth held out (default: photos)")
    s("--data", help="a folder of PNG/JPEG images instead (bottom fifth of each held out)")
    cli.add_flags(p, ebt.ModelConfig, MODEL_FLAGS, {**DEFAULTS, "image_size": "28 for mnist, else 32"})
    cli.add_flags(p, ebt.TrainConfig, TRAIN_FLAGS, DEFAULTS)
    g = p.add_argument_group("thinking (EBT)")
    recipes = ebt.IMAGE_RECIPES
    cli.add_flags(g, ebt.ModelConfig, cli.IMAGE_THINKING_FLAGS, {
        **{k: f"from --recipe: s1 {recipes['s1'][k]}, s2 {recipes['s2'][k]}" for k in recipes["s1"]},
        "step_size_lr_mult": "3 x step_size"})
    cli.add_flags(g, ebt.TrainConfig, ("eval_steps",))
    g.add_argument("--report_steps", type=int, help=f"thinking steps in the report (default: {ebt.THINK_LONGER}x the trained steps)")
    s("--eval_t", type=int, nargs="+", help="report noise levels, DDPM steps (default: k (noise_t + 1) - 1 for "
      "k = 1, 2, 3 up to 1000: 99 199 299)")
    s("--passes", type=int, nargs="+", default=list(DIT_PASSES), help="the DiT's DDIM passes in the report "
      "(default: %(default)s)")
    s("--out_dir", help="checkpoint, metrics and report (default: out-image-MODEL, or out-image-compare)")
    s("--resume", action="store_true", help="continue from out_dir/ckpt.pt with its settings; training flags "
      "given override them, model and data flags must agree")
    cli.add_device_flag(p)
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or ("out-image-compare" if args.compare else f"out-image-{args.model or 'ebt'}")
    args.model = args.model and f"image_{args.model}"  # the config's kind
    if args.compare:  # training checks its out_dir as it takes it (rundir.lock_out_dir)
        rundir.check_out_dir(args.out_dir)
    if args.data and args.dataset:
        raise UsageError(f"--data {args.data} and --dataset {args.dataset}: give one (--data is a folder of images)")
    # eval_t: a DDPM step; passes: DDIM from step t takes at most t
    limits = {"report_steps": (int, 1, 1000), "eval_t": (int, 1, ebt.DDPM_STEPS), "passes": (int, 1, ebt.DDPM_STEPS),
              "n_layer": (int, 1, 1000), "n_embd": (int, 1, 10**5), "batch_size": (int, 1, 10**6),
              "warmup_steps": (int, 0, 10**9)}  # past these sizes no image run can fit, nor end
    cli.check_flags(args, limits)
    return args


def train_models(args, device):
    device = rundir.join_process_group(device)  # under torchrun the ranks own out_dir as one
    with rundir.lock_out_dir(args.out_dir, args.resume):  # a second run into out_dir refuses while this one runs
        ckpt = rundir.checkpoint_to_resume(args.out_dir, ebt.IMAGE_KINDS) if args.resume else None
        kind = ckpt["model_config"]["model"] if ckpt else args.model or "image_ebt"
        cli.refuse_thinking(args, kind, cli.IMAGE_THINKING_FLAGS + ("eval_steps", "recipe"))
        dataset = "folder" if args.data else args.dataset or "photos"
        started = {**ckpt.get("started", {}), **images.data_spec(ckpt)} if ckpt else {  # data_spec reads older checkpoints
            "recipe": args.recipe or "s1" if kind in ebt.EBT_KINDS else None, "dataset": dataset, "data": args.data,
            "photos": images.PHOTOS if dataset == "photos" else None}
        layers = [DEFAULTS, ebt.IMAGE_RECIPES[started["recipe"]] if kind in ebt.EBT_KINDS else {},
                  {"model": kind, "channels": 1 if dataset == "mnist" else 3, "image_size": 28 if dataset == "mnist" else 32}]
        cfg, tc = cli.configs(args, layers, ckpt)
        rundir.check_fits(cfg, tc.batch_size, device)
        tc.out_dir, tc.device = args.out_dir, device
        data = images.load_data({**started, "image_size": cfg.image_size})
        model = ebt.build_model(cfg, tc.seed)
        ebt.train(model, data, tc, rundir.Run(tc.out_dir, {"started": started}, resume=bool(ckpt)))
    return {Path(args.out_dir).name: model.eval()}, data


def load_trained(dirs, device):
    """The image models in dirs (named by their directories), and the data they were trained on."""
    models, spec = {}, None
    for d in dirs:
        ckpt = rundir.load_checkpoint(Path(d) / "ckpt.pt", device)
        if ckpt["model_config"]["model"] not in ebt.IMAGE_KINDS:
            raise UsageError(f"{d}/ckpt.pt is not an image model checkpoint")
        if spec and images.data_spec(ckpt) != spec:
            raise UsageError(f"{d} was trained on other data than {dirs[0]} ({images.data_spec(ckpt)} vs {spec})")
        spec, name = images.data_spec(ckpt), Path(d).resolve().name
        if name in models:
            raise UsageError(f"two --compare directories are named {name}; the report names models by "
                             "their directory, so give them different names")
        models[name] = rundir.load_model(ckpt, device)
    return models, images.load_data(spec)


def denoise_all(models, noisy, t, passes, steps):
    """Every model's denoising of one batch noised to step t: {(name, forward passes): images}, and
    each EBT's mean energy along its steps (on each step's landscape)."""
    out, energies = {("noisy input", 0): noisy}, {}
    for name, model in models.items():
        if isinstance(model, image_models.ImageRegressor):
            with torch.no_grad():
                out[name, 1] = model.denoise(noisy)
        elif isinstance(model, image_models.ImageDiT):
            out.update({(name, p): model.denoise(noisy, t, p) for p in passes})
        else:
            traj = model.think(model.energy, noisy, steps or ebt.THINK_LONGER * model.trained_steps())
            out.update({(name, k): y for k, y in enumerate(traj.ys[1:], 1)})
            energies[name] = [e.mean().item() for e in traj.energies]
    return out, energies


def report(models, data, args, device):
    out = Path(args.out_dir)  # made by writing psnr.md, before the plots
    trained_t = next(iter(models.values())).config.noise_t
    levels = args.eval_t or [t for t in (k * (trained_t + 1) - 1 for k in (1, 2, 3)) if t <= ebt.DDPM_STEPS]
    g = torch.Generator().manual_seed((ebt.TrainConfig.seed if args.seed is None else args.seed) + 2)
    clean = data.batch("val", REPORT_CROPS, generator=g)[0].to(device)
    detailed = clean.flatten(1).std(1).topk(GRID_CROPS).indices
    table, curves, grid = {}, {}, {}
    for t in levels:
        noisy = image_models.ddpm_noise(clean, t, torch.randn(clean.shape, generator=g).to(device))
        preds, curves[t] = denoise_all(models, noisy, t, args.passes, args.report_steps)
        for key, y in preds.items():
            table.setdefault(key, {})[t] = image_models.psnr(y, clean).mean().item()
        if not grid:  # the first level, the trained one; an EBT after its trained steps, a DiT's up to 10 passes
            most = {name: model.trained_steps() if isinstance(model, ebt.Thinker) else 10 for name, model in models.items()}
            for name in dict.fromkeys(n for n, _ in preds):
                p = max((p for (n, p) in preds if n == name and p <= most.get(name, 0)),
                        default=min(p for (n, p) in preds if n == name))
                grid[f"{plots.short(name)}\n{p} pass{'es' * (p > 1)}" if p else name] = preds[name, p][detailed]
            grid["clean"] = clean[detailed]
    seen = lambda t: "trained" if t == trained_t else "unseen"
    head = ["model", "forward passes", *(f"t = {t} ({seen(t)})" for t in levels)]
    rows = [[name, str(p), *(f"{row[t]:.2f}" for t in levels)] for (name, p), row in table.items()]
    text = (f"Data: {data.about}.\n\n"
            f"PSNR (dB, images in [-1, 1]) on {REPORT_CROPS} held-out {data.crop}x{data.crop} crops, DDPM noise at step "
            "t; an EBT's forward passes are its thinking steps (each also a backward pass), a DiT's its DDIM "
            "steps.\n\n" + measure.markdown_table(head, rows) + "\n")
    rundir.write_atomically(out / "psnr.md", lambda tmp: tmp.write_text(text))
    print(text)
    grid_title = (f"{GRID_CROPS} held-out crops noised to t = {levels[0]} ({seen(levels[0])} noise);\neach model's "
                  "denoising after the passes under its name")
    figures = {"grid.png": plots.plot_grid(grid, grid_title), "psnr.png": plots.plot_psnr(table, levels, trained_t)}
    if any(curves.values()):
        figures["energy.png"] = plots.plot_energy(curves, trained_t)
    for name, fig in figures.items():
        plots.sign(fig, *(Path(d) / "ckpt.pt" for d in args.compare or [args.out_dir])).savefig(out / name, dpi=90)
    print("wrote " + ", ".join(str(out / name) for name in ["psnr.md", *figures]))


def main(argv=None):
    args = parse_args(argv)
    device = cli.pick_device(args.device)
    models, data = load_trained(args.compare, device) if args.compare else train_models(args, device)
    if rundir.rank() == 0:  # under torchrun, one report
        report(models, data, args, device)


if __name__ == "__main__":
    cli.invoke(main)
