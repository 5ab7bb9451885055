"""
torch.compile for nanoEBT (train_text.py --compile): the training step as one graph, the same gradient as
Thinker.learn's step-at-a-time backward computed another way, and thinking at inference. A reader of EBTs
need not open this.
"""
import functools

import torch

import ebt


def traced_energy_and_gradient(energy_fn, x, k, create_graph):
    """ebt.energy_and_gradient by torch.func, which torch.compile traces whole (autograd.grad breaks the graph)."""
    def total(x):
        energy = energy_fn(x, k)
        return energy.sum(), energy
    with torch.set_grad_enabled(create_graph):  # without it, no graph to the parameters
        grad, (_, energy) = torch.func.grad_and_value(total, has_aux=True)(x)
    return energy, grad


def compile_model(model, mode=None):
    """torch.compile what pays. A model that does not think: its loss. An EBT: its training step whole
    (compiled_learn) and, at inference, each thinking step and, for text, each generated token and the context
    stream. torch.compile cannot trace autograd.grad(create_graph=True), so the compiled EBT takes every
    gradient of the energy by torch.func (traced_energy_and_gradient), in the same think(). mode:
    torch.compile's for the training step and a generated token ("reduce-overhead": CUDA graphs)."""
    if not isinstance(model, ebt.Thinker):
        model.forward = torch.compile(model.forward, mode=mode)
        return model
    model.learn = compiled_learn(model, mode)
    model.gradient = torch.compile(traced_energy_and_gradient)
    if isinstance(model, ebt.TextEBT):
        model.trunk.forward = torch.compile(model.trunk.forward)
        model.next_token = torch.compile(model.next_token, mode=mode)  # fixed shapes (ebt.KVCache)
    return model


def compiled_learn(model, mode=None):
    """A drop-in for model.learn as one compiled graph: torch.func.grad of the model's loss in training mode
    (forward, through ebt.think) with respect to its parameters; what a graph cannot hold stays out of it:
    the random start (a torch.Generator), the replay buffer's picks and its update."""
    text = isinstance(model, ebt.TextEBT)

    @functools.cache
    def graph(steps):  # one per step count (S2: 2 and 3)
        loss = lambda params, *args, **kw: torch.func.functional_call(model, params, args, {**kw, "steps": steps})
        return torch.compile(torch.func.grad_and_value(loss, has_aux=True), dynamic=False, mode=mode)

    def learn(x, y, weight, steps=None, generator=None):
        kw, fresh, step = {}, len(x), graph(model.step_count(steps))
        if text:
            x, y, kw["y0"] = model.training_starts(x, y, generator)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        grads, (_, metrics) = step({n: p.detach() for n, p in named}, x, y, **kw)
        for n, p in named:
            p.grad = grads[n] * weight if p.grad is None else p.grad + grads[n] * weight
        final = metrics.pop("final", None)
        if text:
            model.remember(x[:fresh], y[:fresh], final[:fresh])
        return metrics
    return learn
