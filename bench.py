"""
Training throughput and memory: the EBT with 1, 2 and 3 thinking steps against the
Transformer++ on the same backbone and batch. Then generation speed of the EBT: with the
KV cache, recomputing the context stream per token, and recomputing everything per token.

    python bench.py                      # CPU preset size (4 layers, width 128, batch 16 x 64)
    python bench.py --device cuda --n_layer 6 --n_embd 384 --n_head 6 --block_size 256 --batch_size 64

Each configuration runs in its own process. Peak memory on CPU is that process's peak
resident set size minus its size before the first training step (torch itself and the
model are the same for all); on CUDA it is torch.cuda.max_memory_allocated.
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import torch

import ebt


def flops_per_step(cfg, B, S, steps):
    """Model FLOPs of one training step (matmuls only; elementwise work is small).

    One forward of one stream over B x S tokens costs F = 2 * B * S * (weights a token
    meets) + attention. A Transformer++ step is forward + backward = 3F. An EBT step is
    3F for the context stream (forward and backward once, reused at every thinking step),
    then per thinking step: the prediction stream forward (F), the gradient with respect to
    the logits (F: input gradients only), and the backward of both through the loss, which
    needs weight and input gradients of the forward and of the gradient computation (4F).
    So EBT ~ (3 + 6K) F against 3F, i.e. 3x, 5x, 7x for K = 1, 2, 3 thinking steps.
    """
    D, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    hidden = 4 * D * 2 // 3
    per_token = L * (3 * D * D + D * D + 3 * D * hidden)  # qkv, proj, SwiGLU weights
    attention = L * 2 * S * D  # QK^T and AV for a causal average of S/2 keys, x2 FLOPs/MAC
    if cfg.model == "transformer":
        F = 2 * B * S * (per_token + D * V) + 2 * B * S * attention
        return 3 * F
    F = 2 * B * S * per_token + 2 * B * S * attention
    F_pred = F + 2 * B * S * (D * V + D)  # prediction embedding and energy head
    return 3 * F + steps * 6 * F_pred


def measure(kind, steps, args):
    """Time training steps of one configuration in this process."""
    device = ebt.pick_device(args.device)
    torch.manual_seed(0)
    cfg = ebt.ModelConfig(model=kind, vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                          n_head=args.n_head, n_embd=args.n_embd, think_steps=max(steps, 1))
    model = ebt.build_model(cfg).to(device)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4)
    x = torch.randint(args.vocab_size, (args.batch_size, args.block_size), device=device)

    def step():
        with ebt.autocast(device):
            loss, _ = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):  # the median step: this shared machine has noisy neighbours
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    dt = sorted(times)[len(times) // 2]
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:  # what training added to the process: peak RSS minus the RSS with the model built
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    flops = flops_per_step(cfg, args.batch_size, args.block_size, steps)
    return {"model": kind, "steps": steps, "step_s": dt, "tokens_per_s": args.batch_size * args.block_size / dt,
            "peak_mb": peak / 2**20, "tflops": flops / dt / 1e12, "device": device}


def time_generation(args, contexts=(64, 256), new_tokens=16):
    """Tokens/s of EBT generation (2 thinking steps, 1 candidate) for a window growing to
    each context length C (prompt of C - new_tokens random tokens):
    - cached: generate() with the KV cache of the context stream;
    - context recompute: generate(use_cache=False), the context stream re-run per token;
    - full recompute: what a plain implementation does per token, the training forward on
      the whole window (thinking at every position) to read off the last prediction."""
    device = ebt.pick_device(args.device)
    torch.manual_seed(0)
    cfg = ebt.ModelConfig(vocab_size=args.vocab_size, block_size=max(contexts), n_layer=args.n_layer,
                          n_head=args.n_head, n_embd=args.n_embd)
    model = ebt.build_model(cfg).to(device).eval()
    g = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def rate(fn, n, repeats=3):
        fn()  # warm-up
        best = float("inf")
        for _ in range(repeats):  # the best of a few runs: the least disturbed one
            sync()
            t = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return n / best

    rows = []
    for C in contexts:
        prompt = torch.randint(args.vocab_size, (1, C - new_tokens), generator=g).to(device)
        window = torch.randint(args.vocab_size, (1, C), generator=g).to(device)
        with ebt.autocast(device):
            rows.append({"context": C, **{f"{name}_tok_s": rate(fn, n) for name, fn, n in (
                ("cached", lambda: ebt.generate(model, prompt, new_tokens, generator=g), new_tokens),
                ("context", lambda: ebt.generate(model, prompt, new_tokens, generator=g, use_cache=False), new_tokens),
                ("full", torch.no_grad()(lambda: model.predict(window).ys[-1][:, -1]), 1))}})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--vocab_size", type=int, default=65)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak_tflops", type=float, default=989.0, help="for MFU on CUDA (H100/H200 dense bf16: 989)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one "kind:steps" and print JSON
    args = p.parse_args()
    if args.one:
        kind, steps = args.one.split(":")
        print(json.dumps(measure(kind, int(steps), args)))
        return
    rows = []
    for one in ("transformer:0", "ebt:1", "ebt:2", "ebt:3"):
        r = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", one], capture_output=True, text=True)
        if r.returncode:
            sys.exit(r.stderr)
        rows.append(json.loads(r.stdout))
    base = rows[0]
    print(f"device {base['device']}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.n_layer} layers x {args.n_embd} wide, batch {args.batch_size} x {args.block_size}")
    cuda = base["device"].startswith("cuda")
    print(f"| model | step (ms) | tokens/s | x Transformer++ time | peak training memory (MB) | x Transformer++ memory |"
          + (" MFU |" if cuda else ""))
    print("|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    for r in rows:
        name = "Transformer++" if r["model"] == "transformer" else f"EBT, {r['steps']} step{'s' * (r['steps'] > 1)}"
        print(f"| {name} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | {r['step_s'] / base['step_s']:.2f} | "
              f"{r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f} |"
              + (f" {100 * r['tflops'] / args.peak_tflops:.1f}% |" if cuda else ""))
    print("\nEBT generation, 2 thinking steps, 1 candidate (tokens/s; speed-up of the cache in brackets)")
    print("| context | cached | context stream recomputed | everything recomputed |")
    print("|---|---|---|---|")
    for r in time_generation(args):
        c = r["cached_tok_s"]
        print(f"| {r['context']} | {c:.1f} | {r['context_tok_s']:.1f} ({c / r['context_tok_s']:.1f}x) | "
              f"{r['full_tok_s']:.1f} ({c / r['full_tok_s']:.1f}x) |")


if __name__ == "__main__":
    main()
