"""
Training throughput and memory: the EBT with 1, 2 and 3 thinking steps against the Transformer++ on the same
backbone and batch. Then the EBT's generation speed: KV-cached, and recomputed per token (context, or everything).

    python bench.py                      # CPU preset size (4 layers, width 128, batch 16 x 64)
    python bench.py --device cuda --n_layer 6 --n_embd 384 --n_head 6 --block_size 256 --batch_size 64
    python bench.py --only transformer:0 ebt:2 --no_generation       # two configurations, training only

How each column is measured, and why (memory on CPU from a second process): assets/speed.md.
"""
import cli  # first: a Ctrl-C while torch loads exits quietly
import argparse
import contextlib
import copy
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import compiled
import ebt
import image_models  # noqa: F401  (the image kinds)
import rundir
import train_text
from measure import markdown_table

HERE = Path(__file__).resolve().parent


def flops_per_step(cfg, B, S):
    """Model FLOPs of one training step, matrix products only: what MFU counts and results.py compares models by.
    Elementwise work is left out: at the CPU preset about half of a Transformer++ step's time, more of an EBT's
    (differentiated twice), so measured time ratios sit above these FLOP ratios at small widths.

    One forward of one stream over B x S tokens costs F. A Transformer++ step is 3F. An EBT step is 3F for the
    context stream (reused at every thinking step), then per thinking step the prediction stream's forward and its
    gradient with respect to the logits (2F); a trained step adds the backward of both through the loss (4F). So S1
    (2 steps, both trained) ~ (3 + 12) F, 5x; S2 (the last step trained, half a batch more replayed) ~ 1.5 (3 + 9) F,
    6x. Not counted: the context stream's second forward (TextEBT.learn trades F of time for its activations' memory).
    """
    D, L, V, hidden = cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.mlp_hidden
    per_token = L * (3 * D * D + D * D + 3 * D * hidden)  # qkv, proj, SwiGLU weights
    attention = L * S * D  # multiply-adds of QK^T and AV per token, over a causal average of S/2 keys
    if cfg.model == "transformer":
        return 3 * 2 * B * S * (per_token + attention + D * V)
    F = 2 * B * S * (per_token + attention)
    F_pred = F + 2 * B * S * (D * V + D)  # prediction embedding and energy head
    steps = cfg.think_steps + cfg.random_steps / 2  # on average
    trained = 1 if cfg.truncate else steps
    rows = 1 + (cfg.replay_batch if cfg.replay_size else 0)  # replayed sequences join the batch
    return rows * (3 * F + 2 * steps * F_pred + 4 * trained * F_pred)


def measure(kind, steps, args, rounds=(None,), ready=lambda: None):
    """Time training steps of one configuration in this process: build and warm it up, call ready(), then
    yield one measurement (the median of args.iters steps) for each item of rounds."""
    device = cli.pick_device(args.device)
    torch.manual_seed(0)
    thinking = dict(think_steps=max(steps, 1), landscapes=max(steps, 1))
    if args.s2:  # S2's options (train_text.py --recipe s2) without its replay buffer, at a fixed step count
        thinking = ebt.derive_thinking({**ebt.RECIPES["s2"], "think_steps": max(steps, 1), "random_steps": 0,
                                        "replay_size": 0})  # alpha's learning rate as train_text.py derives it
    image = kind in ebt.IMAGE_KINDS  # train_image.py's crops and patches, an EBT thinking as its S1 does
    if image:
        thinking = ebt.derive_thinking({**ebt.IMAGE_RECIPES["s1"], "think_steps": max(steps, 1)})
    cfg = ebt.ModelConfig(model=kind, vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                          n_head=args.n_head, n_embd=args.n_embd, **thinking)
    model = ebt.build_model(cfg).to(device)
    if args.compile:
        compiled.compile_model(model, args.compile_mode)
    opt = torch.optim.AdamW(ebt.param_groups(model, 0.1), lr=1e-4)
    x = (torch.rand(args.batch_size, cfg.channels, cfg.image_size, cfg.image_size, device=device) if image else
         torch.randint(args.vocab_size, (args.batch_size, args.block_size), device=device))

    def step():  # as train() does it: the model backpropagates (an EBT one thinking step at a time)
        with ebt.autocast(device):
            if args.one_backward or not isinstance(model, ebt.Thinker):  # the EBT, for comparison: one backward
                model(x, x)[0].backward()
            else:
                model.learn(x, x, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    rss_before, t0 = peak_rss(), time.perf_counter()
    for _ in range(max(args.warmup, 1 if args.compile else 0)):
        step()
    compile_s = time.perf_counter() - t0  # compiled: the warm-up compiles (the first step and each new shape)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    elif args.compile and Path("/proc/self/clear_refs").exists():  # leave the compiler's own peak out (Linux)
        Path("/proc/self/clear_refs").write_text("5")
        rss_before = peak_rss()
    ready()
    flops = flops_per_step(cfg, args.batch_size, args.block_size)
    for _ in rounds:
        times = sorted(timed(step, device) for _ in range(args.iters))
        dt = times[len(times) // 2]  # the median step: this shared machine has noisy neighbours
        peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss() - rss_before
        yield {"model": kind, "steps": steps, "step_s": dt, "tokens_per_s": args.batch_size * args.block_size / dt,
               "peak_mb": peak / 2**20, "estimate_mb": rundir.training_memory(cfg, args.batch_size, args.compile) / 2**20,
               "tflops": flops / dt / 1e12, "device": device, "compile_s": compile_s}


def timed(fn, device):
    """The wall time of one call of fn, the device's queue drained before and after."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def peak_rss():
    """This process's peak resident set in bytes: VmHWM on Linux (which clear_refs resets), else ru_maxrss."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def allocated_memory_env():
    """glibc's malloc keeps freed blocks for reuse; mapped on its own, each block of 64 kB or more is returned when
    freed, and the peak resident set follows what is allocated, as on CUDA. Slower: no timing is taken from it."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def measure_alternating(ones, argv, rounds, env=None):
    """measure() of each "kind:steps" in a process of its own (each peak its own), built and warmed up one at a time,
    then timed in rounds alternating between them, the order turned each round: a neighbour's load falls on each of
    a round alike. Per configuration: its last measurement, step_s and tokens_per_s from its median round, rounds_s."""
    workers = []

    def answer(proc, err, one):  # a line of the worker's, or its one-line error as ours (exit code 2)
        line = proc.stdout.readline()
        if line:
            return line
        proc.wait()
        err.seek(0)
        lines = err.read().strip().splitlines()
        raise ebt.UsageError(lines[-1].removeprefix("error: ") if lines else
                             f"measuring {one} failed (exit code {proc.returncode})")
    try:
        for one in ones:
            err = tempfile.TemporaryFile("w+")
            proc = subprocess.Popen([sys.executable, __file__, *argv, "--one", one], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            workers.append((proc, err, one))
            answer(proc, err, one)  # "ready": no configuration is timed while another is built or compiled
        per_round = [[None] * len(ones) for _ in range(rounds)]
        for r in range(rounds):
            for i in [(r + j) % len(ones) for j in range(len(ones))]:
                proc, err, one = workers[i]
                proc.stdin.write("round\n")
                proc.stdin.flush()
                per_round[r][i] = json.loads(answer(proc, err, one))
    finally:
        for proc, err, _ in workers:
            with contextlib.suppress(OSError):
                proc.stdin.close()  # the end of its rounds
            proc.wait()
            err.close()
    rows = []
    for i in range(len(ones)):
        times = [per_round[r][i]["step_s"] for r in range(rounds)]
        median = sorted(times)[len(times) // 2]
        tokens = per_round[-1][i]["tokens_per_s"] * per_round[-1][i]["step_s"]
        rows.append({**per_round[-1][i], "step_s": median, "tokens_per_s": tokens / median, "rounds_s": times})
    return rows


def time_generation(args, contexts=(64, 128, 256), new_tokens=16):
    """Tokens/s of EBT generation (2 thinking steps, 1 candidate) for a window growing to each context length C:
    cached, the context stream recomputed, and the reference's way (the paper's code re-runs all 2C tokens at
    every thinking step); each scores the final state."""
    device = cli.pick_device(args.device)
    torch.manual_seed(0)
    cfg = ebt.ModelConfig(vocab_size=args.vocab_size, block_size=max(contexts), n_layer=args.n_layer,
                          n_head=args.n_head, n_embd=args.n_embd)
    reference = ebt.build_model(cfg).to(device).eval()
    model = compiled.compile_model(copy.deepcopy(reference), args.compile_mode) if args.compile else reference
    g = torch.Generator().manual_seed(0)

    def rate(fn, n, repeats=3):
        fn()  # warm-up
        return n / min(timed(fn, device) for _ in range(repeats))  # the best of a few: the least disturbed

    def reference_way(window):  # always eager, as the paper's code runs
        y0 = reference.initial_logits(*window.shape, device)
        energy = lambda p, k: reference.energy(p, reference.context(window), min(k, cfg.landscapes - 1))
        return ebt.think(energy, y0, 2, reference.step_size().detach(),  # both streams again at every step
                         normalize=reference.normalize).ys[-1][:, -1]

    rows = []
    for C in contexts:
        prompt = torch.randint(args.vocab_size, (1, C - new_tokens), generator=g).to(device)
        window = torch.randint(args.vocab_size, (1, C), generator=g).to(device)
        with ebt.autocast(device):
            rows.append({"context": C, **{f"{name}_tok_s": rate(fn, n) for name, fn, n in (
                ("cached", lambda: ebt.generate(model, prompt, new_tokens, generator=g), new_tokens),
                ("context", lambda: ebt.generate(model, prompt, new_tokens, generator=g, use_cache=False), new_tokens),
                ("reference", lambda: reference_way(window), 1))}})
    return rows


def run_until(argv, out_dir, seconds=None, step=None, start_up=300):
    """Run a training command; stop it with SIGTERM (it saves) once it has trained for `seconds`, counted from
    its first logged step so that start-up and compiling are not (given at most `start_up` seconds), or once
    it has logged `step`. Returns its metrics records and its output."""
    t0, first, metrics, done = time.time(), None, Path(out_dir) / "metrics.jsonl", False
    with tempfile.TemporaryFile("w+") as output:  # a file, not a pipe: a pipe nobody reads fills and blocks
        proc = subprocess.Popen([sys.executable, *argv], stdout=output, stderr=subprocess.STDOUT, text=True)
        while proc.poll() is None:
            time.sleep(1)
            trained = [r for r in rundir.read_records(metrics) if r["kind"] == "train"] if metrics.exists() else []
            first = first or (time.time() if trained else None)
            done = seconds is not None and (time.time() - first > seconds if first else time.time() - t0 > seconds + start_up)
            done = done or (step is not None and any(r["step"] >= step for r in trained))
            if done:
                proc.send_signal(signal.SIGTERM)
                break
        proc.wait()
        output.seek(0)
        output = output.read()
    if proc.returncode not in (0, 130 if done else 0):  # 130: stopped by us, saved
        raise ebt.UsageError(f"{' '.join(map(str, argv))} failed (exit code {proc.returncode}): "
                             + (output.strip().splitlines() or ["no output"])[-1])
    return rundir.read_records(metrics), output


def summarise_run(records, max_steps):
    train = [r for r in records if r["kind"] == "train"]
    if not train:
        return {"steps": 0, "note": "no training step was logged in the time given"}
    first, train = train[0], train[1:] or train  # the first interval includes start-up (and compiling)
    evals = [r for r in records if r["kind"] == "eval"]
    tok_s = sorted(r["tokens_per_s"] for r in train)[len(train) // 2]
    steps, elapsed = train[-1]["step"], train[-1]["elapsed_s"]
    per_step = (elapsed - first["elapsed_s"]) / (steps - first["step"]) if steps > first["step"] else elapsed / steps
    return {"steps": steps, "tokens_per_s": tok_s, "peak_mem_gb": max(r.get("peak_mem_mb", 0) for r in train) / 1024,
            "start_up_s": first["elapsed_s"] - per_step * first["step"], "wall_s_per_step": per_step,
            "projected_full_run_min": (first["elapsed_s"] + per_step * (max_steps - first["step"])) / 60,
            "val_loss": {r["step"]: r["loss"] for r in evals}}


def gpu_check(out, args):
    """The GPU measurements of assets/speed.md ("Ready for the next GPU"), most telling first, each written to
    OUT/gpu_check.json as soon as it is made: a run cut short keeps what it measured."""
    runs = Path(tempfile.mkdtemp())  # checkpoints stay out of OUT: only the summary and logs go there
    cuda = torch.cuda.is_available()
    result = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}

    def keep(name, value):
        result[name] = value
        print(f"{name}: {value}", flush=True)
        rundir.write_atomically(out / "gpu_check.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    size = ["--device", args.device, "--n_layer", str(args.n_layer), "--n_head", str(args.n_head), "--n_embd",
            str(args.n_embd), "--block_size", str(args.block_size), "--batch_size", str(args.batch_size)]
    for name, extra in (("bench eager", []), ("bench compiled", ["--compile"]),
                        ("bench CUDA graphs", ["--compile", "--compile_mode", "reduce-overhead"])):
        r = subprocess.run([sys.executable, __file__, *size, "--iters", str(args.iters), "--warmup", str(args.warmup),
                            "--only", "transformer:0", "ebt:2", *extra], capture_output=True, text=True)
        keep(name, r.stdout if r.returncode == 0 else r.stderr[-2000:])
    max_steps, train = train_text.PRESETS["gpu"]["max_steps"], str(HERE / "train_text.py")
    for name, extra in (("ebt", []), ("ebt compiled", ["--compile"]), ("transformer", ["--model", "transformer"])):
        until = {"seconds": args.seconds}
        if name == "transformer":  # as many steps as the eager EBT trained
            until = {"step": result["python train_text.py"]["steps"]}
        records, log = run_until([train, "--device", args.device, *extra, "--out_dir", str(runs / name)], runs / name,
                                 **until)
        (out / f"{name.replace(' ', '_')}.log").write_text(log)
        keep(f"python train_text.py {' '.join(extra)}".strip(), summarise_run(records, max_steps))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", str(HERE / "test_ebt.py"), "-m", "cuda"],
                       capture_output=True, text=True, cwd=HERE)
    keep("cuda tests", (r.stdout.strip().splitlines() or [f"pytest printed nothing: {r.stderr[-500:]}"])[-1])


def main(argv=None):
    cpu = train_text.PRESETS["cpu"]  # the default size: train_text.py's CPU preset
    p = cli.ArgumentParser(description=__doc__)
    cli.add_device_flag(p)
    for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size"):
        p.add_argument(f"--{k}", type=int, default=cpu[k], help="(default: %(default)s, the CPU preset's)")
    p.add_argument("--vocab_size", type=int, default=65)
    p.add_argument("--iters", type=int, default=10, help="timed steps a round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds alternating between the configurations; each "
                   "ratio is the median of the rounds' own (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak_tflops", type=float, default=989.0, help="for MFU on CUDA (H100/H200 dense bf16: 989)")
    p.add_argument("--compile", action="store_true", help="torch.compile as train_text.py --compile does; "
                   "generation then also compiles the thinking step (the reference's way stays eager)")
    p.add_argument("--compile_mode", choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile's mode for the training step (reduce-overhead: CUDA graphs)")
    p.add_argument("--s2", action="store_true", help="the EBT with S2's options (no replay buffer)")
    p.add_argument("--one_backward", action="store_true",
                   help="backpropagate an EBT's loss at once, not one thinking step at a time (for comparison)")
    p.add_argument("--only", nargs="+", help="configurations to measure, e.g. transformer:0 ebt:2 (default: all)")
    p.add_argument("--no_generation", action="store_true", help="training only")
    p.add_argument("--gpu_check", metavar="OUT", help="the README's 'On one GPU' measurements, JSON in OUT")
    p.add_argument("--seconds", type=float, default=90, help="--gpu_check: wall time of each default text run")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one "kind:steps" and print JSON
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    limits = {"iters": (int, 1, 10_000), "rounds": (int, 1, 1000), "warmup": (int, 0, 10_000),
              "n_layer": (int, 1, 10_000), "n_head": (int, 1, 10_000), "n_embd": (int, 1, 10**5),
              "block_size": (int, 1, 10**5), "batch_size": (int, 1, 10**5), "vocab_size": (int, 1, 10**7),
              "peak_tflops": (float, 1e-3, 1e6), "seconds": (float, 1, 10**6)}
    cli.check_flags(args, limits)
    if any(a.split("=")[0] == "--seconds" for a in argv) and not args.gpu_check:  # else a wrong value passes unseen
        print("warning: --seconds is read only with --gpu_check: ignored", file=sys.stderr)
    if args.gpu_check:
        rundir.check_out_dir(args.gpu_check, "--gpu_check")
        if not cli.pick_device(args.device).startswith("cuda") and "--device" not in argv:
            raise ebt.UsageError("--gpu_check found no CUDA GPU: its runs are sized for one (hours here); on a CPU "
                                 "pass --device cpu and small sizes to try the script")
    for one in [args.one] if args.one else args.only or ():
        kind, _, steps = one.partition(":")
        if not ((kind in ("transformer", "image_dit", "image_regressor") and steps == "0")
                or (kind in ebt.EBT_KINDS and steps.isdigit() and int(steps) > 0)):
            raise ebt.UsageError(f"--only {one}: each configuration is transformer:0, image_dit:0, image_regressor:0, "
                                 "or ebt:K or image_ebt:K with K >= 1 thinking steps")
    if args.gpu_check:
        return gpu_check(Path(args.gpu_check), args)
    if args.one:  # a worker of measure_alternating: "ready", then a measurement for each line it is sent
        kind, steps = args.one.split(":")
        for row in measure(kind, int(steps), args, sys.stdin, ready=lambda: print("ready", flush=True)):
            print(json.dumps(row), flush=True)
        return
    cuda = cli.pick_device(args.device).startswith("cuda")
    ones = args.only or ("transformer:0", "ebt:1", "ebt:2", "ebt:3")
    rows = measure_alternating(ones, argv, args.rounds)
    for one, row in zip(ones, rows):
        if not cuda:  # memory again, with glibc returning every freed block (see allocated_memory_env)
            allocated, = measure_alternating([one], [*argv, "--iters", "1", "--warmup", "2"], 1,
                                             env=allocated_memory_env())
            row["resident_mb"], row["peak_mb"] = row["peak_mb"], allocated["peak_mb"]
    base = rows[0]  # the first configuration is the reference of the ratios
    print(f"device {base['device']}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.n_layer} layers x {args.n_embd} wide, batch {args.batch_size} x {args.block_size}")
    baselines = {"transformer": "Transformer++", "image_dit": "image DiT", "image_regressor": "image regressor"}
    ebts = lambda r: f"{r['model'].replace('_', ' ').replace('ebt', 'EBT')}, {r['steps']} step{'s' * (r['steps'] > 1)}"
    name = lambda r: baselines.get(r["model"]) or ebts(r)
    ref = name(base)
    print(f"step: the median over {args.rounds} alternating rounds of {args.iters} steps each; x {ref} time: the median "
          "of the rounds' own ratios (their range)")
    head = ["model", "step (ms)", "tokens/s", f"x {ref} time", "peak training memory (MB)", "estimated (MB)",
            f"x {ref} memory"]
    head += ["MFU"] if cuda else ["peak resident set (MB)", f"x {ref} resident set"]
    table = []
    for r in rows:
        ratio = lambda k: f"{r[k] / base[k]:.2f}" if base[k] > 0 else "-"
        per_round = sorted(t / b for t, b in zip(r["rounds_s"], base["rounds_s"]))  # each round's own ratio
        time_ratio = f"{per_round[len(per_round) // 2]:.2f}" + (
            f" ({per_round[0]:.2f}-{per_round[-1]:.2f})" if len(per_round) > 1 else "")
        mfu = [f"{100 * r['tflops'] / args.peak_tflops:.1f}%"]
        table.append([name(r), f"{r['step_s'] * 1e3:.1f}", f"{r['tokens_per_s']:,.0f}", time_ratio,
                      f"{r['peak_mb']:.0f}", f"{r['estimate_mb']:.0f}", ratio("peak_mb"),
                      *(mfu if cuda else [f"{r['resident_mb']:.0f}", ratio("resident_mb")]),
                      *([f"{r['compile_s']:.0f}"] if args.compile else [])])
    print(markdown_table(head + (["compiling (s)"] if args.compile else []), table))
    if args.no_generation:
        return
    print("\nEBT generation, 2 thinking steps, 1 candidate (tokens/s; speed-up of the cache in brackets)")
    speed_up = lambda r, k: f"{r[k]:.1f} ({r['cached_tok_s'] / r[k]:.1f}x)"
    print(markdown_table(["context", "cached", "context stream recomputed",
                          "both streams recomputed every step (the reference's way)"],
                         [[str(r["context"]), f"{r['cached_tok_s']:.1f}", speed_up(r, "context_tok_s"),
                           speed_up(r, "reference_tok_s")] for r in time_generation(args)]))


if __name__ == "__main__":
    cli.invoke(main)
