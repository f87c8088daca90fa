"""The attention-sink circuit: the few MLP neurons that build a model's massive activations.

Real LLMs write a residual tens to hundreds of times the typical token's at position 0 (the
attention sink; SmolLM2-135M: 152x by layer 15), and they build it in a few MLP neurons of the
early blocks. Under real norms the circuit is harmless on other tokens: each block sees every
token at unit size. Once the norms are fixed scales it is not. In SmolLM2 with the outlier
clip lifted from blocks 0-7, an ordinary token of hard-wrapped prose came out of block 1's
MLP 6.6x larger than position 0 does, through position 0's own top neurons (83, 609, ...),
and block 2's sink neurons (430, 701, 90, ...) took it from 4.9x to 3.4e4 its scale: a SwiGLU
MLP squares its input, so the circuit runs away block after block to inf
(docs/BENCHMARKS.md).

``sink_neurons`` finds the circuit in the original model: in each block, the ``k`` neurons
whose share of position 0's MLP output is largest, ``|a_n| * ||w_n||`` with ``a_n`` the
neuron's activation and ``w_n`` the vector it writes to the residual, averaged over the given
sequences. ``prune_neurons`` zeroes them: every weight and bias that makes a neuron's
activation and the column that writes it (a plain weight edit, so every export keeps it), and
their AdamW moments, so they stay at zero while the run trains (a zero activation gets no
gradient, and a zero write column passes none back).

``fade_neurons`` is the gradual way (``prune_fade``): while it is on, each of those neurons'
output is multiplied by a factor on the way into the writing weight, so a run can take the
circuit away over many steps and the model learns to do without it, before ``prune_neurons``
makes it a weight edit. Cut at once, it costs the original SmolLM2 3.7 nats of held-out CE
(16 per block), and the run spends its budget winning that back (docs/BENCHMARKS.md).

On SmolLM2, 16 neurons per block (1% of the MLP) took the first break of the clip lift from
block 8 to block 12, with blocks 0-11 norm-free at the original's held-out CE; past that, a
token that reaches ~3x its scale runs away through ordinary neurons (docs/BENCHMARKS.md,
attempt 19). Pruning the circuit is necessary there, not sufficient.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from noln.arch import check_supported
from noln.arch.base import MlpNeurons


def _layers(model: nn.Module) -> tuple[nn.ModuleList, MlpNeurons]:
    cls = check_supported(model.config)
    return model.get_submodule(cls.layout.layers), cls.mlp_neurons


@torch.no_grad()
def sink_neurons(model: nn.Module, input_ids: torch.Tensor, k: int,
                 blocks: Iterable[int] | None = None) -> dict[int, list[int]]:
    """Per block (of ``blocks``; None: every block), the ``k`` MLP neurons writing the most
    into position 0's residual, on ``input_ids`` (``[batch, seq]``): the mean over sequences
    of ``|a_n| * ||w_n||``."""
    layers, spec = _layers(model)
    path, dim = spec.write
    activations: dict[int, torch.Tensor] = {}
    hooks = [layer.get_submodule(path.rpartition(".")[0]).register_forward_pre_hook(
        lambda module, args, i=i: activations.__setitem__(i, args[0][:, 0].detach().float()))
        for i, layer in enumerate(layers)]
    was = model.training
    model.eval()
    try:
        model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        model.train(was)
        for hook in hooks:
            hook.remove()
    sinks = {}
    for i in range(len(layers)) if blocks is None else sorted(blocks):
        write = layers[i].get_parameter(path).detach().float()
        share = (activations[i].abs() * write.norm(dim=1 - dim)).mean(0)  # [neurons]
        sinks[i] = share.topk(min(k, share.numel())).indices.sort().values.tolist()
    return sinks


@torch.no_grad()
def prune_neurons(model: nn.Module, neurons: dict[int, list[int]],
                  optimizer: torch.optim.Optimizer | None = None) -> int:
    """Zero ``neurons`` (block -> neuron indices) in ``model``, and their slices of the
    ``optimizer``'s state (AdamW's moments); returns how many of them had a nonzero weight."""
    layers, spec = _layers(model)
    state = getattr(optimizer, "optimizer", optimizer).state if optimizer is not None else {}
    changed = 0
    for block, idx in neurons.items():
        layer = layers[block]
        index = torch.tensor(idx, dtype=torch.long)
        params = [(layer.get_parameter(p), d) for p, d in (*spec.make, spec.write)]
        write, dim = params[-1]
        changed += int((write.index_select(dim, index.to(write.device)) != 0)
                       .any(dim=1 - dim).sum())
        for param, d in params:
            param.index_fill_(d, index.to(param.device), 0.0)
            for moment in state.get(param, {}).values():
                if isinstance(moment, torch.Tensor) and moment.shape == param.shape:
                    moment.index_fill_(d, index.to(moment.device), 0.0)
    return changed


def fade_at(step: int, steps: int) -> float:
    """What fading neurons write of their output at ``step`` of a ``steps``-step fade
    (``prune_fade``): 1 at its start, 0 from its end on."""
    return max(0.0, 1.0 - step / steps)


@contextmanager
def fade_neurons(model: nn.Module, neurons: dict[int, list[int]],
                 factor: torch.Tensor) -> Iterator[None]:
    """Within the block, ``neurons`` (block -> neuron indices) of ``model`` write ``factor``
    times their activation: a hook on each writing module scales those channels of its input
    (the activations). ``factor`` is a 0-d tensor the caller changes in place between forwards
    (a tensor, so a compiled model reads it without recompiling). Gradients flow through the
    scaled activation."""
    layers, spec = _layers(model)
    path = spec.write[0].rpartition(".")[0]

    def hook(module: nn.Module, args: tuple, faded: torch.Tensor) -> tuple:
        activations, *rest = args
        scale = torch.where(faded, factor.to(torch.float32), 1.0)  # (fp32: the exact factor)
        return ((activations * scale).to(activations.dtype), *rest)

    handles = []
    for block, idx in neurons.items():
        if not idx:
            continue
        write = layers[block].get_submodule(path)
        width = layers[block].get_parameter(spec.write[0]).shape[spec.write[1]]
        faded = torch.zeros(width, dtype=torch.bool, device=factor.device)
        faded[torch.tensor(idx, dtype=torch.long, device=factor.device)] = True
        handles.append(write.register_forward_pre_hook(
            lambda module, args, faded=faded: hook(module, args, faded)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def scale_neurons(model: nn.Module, neurons: dict[int, list[int]], factor: float) -> None:
    """Multiply what ``neurons`` write by ``factor``, as a weight edit: the model
    ``fade_neurons`` trains at that factor, for inference (a checkpoint saved mid-fade)."""
    layers, spec = _layers(model)
    path, dim = spec.write
    for block, idx in neurons.items():
        write = layers[block].get_parameter(path)
        index = torch.tensor(idx, dtype=torch.long, device=write.device)
        write.index_copy_(dim, index, write.index_select(dim, index) * factor)
