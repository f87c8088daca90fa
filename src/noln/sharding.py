"""FSDP2 for ``noln remove``: weights, gradients and AdamW state sharded over the processes.

Each transformer block is one FSDP unit (the classes a Hugging Face model lists in
``_no_split_modules``), the root module holds the rest (embeddings, final norm, head). Per block
matters: a block's split ln_1 and the projection reading it share parameters, and a unit
gathers all of its parameters before its forward, so both see full tensors.

Checkpoints keep the one-process format (full tensors; AdamW state keyed by the parameter's
index), gathered on every rank and written by rank 0, so a sharded run resumes on one GPU, a
one-GPU run resumes sharded, and the exports read a plain model.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from noln.errors import NolnError


def fsdp_requested(cfg_fsdp: bool) -> bool:
    """``--fsdp``, or ``accelerate launch --use_fsdp`` (which sets ACCELERATE_USE_FSDP)."""
    return cfg_fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model: nn.Module, device: torch.device, mesh=None):
    """``fully_shard`` each block, then the root, in place; returns the device mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise NolnError(f"--fsdp needs FSDP2 (torch >= 2.6; this is {torch.__version__}): "
                        "upgrade torch, or train data-parallel without --fsdp") from None
    if mesh is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model.to(device)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return mesh


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor whole, on the CPU of rank 0 (other ranks get ``{}``). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter in index order (a shared tensor: its first name)."""
    names: dict[int, str] = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """AdamW's state whole and keyed by index, as ``optimizer.state_dict()`` of an unsharded
    run; on rank 0 (other ranks get ``{}``). Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not optimizer.state:  # before the first step; torch would take a zero-gradient step
        # to create the state, and AdamW's bias correction would count it
        return optimizer.state_dict() if dist.get_rank() == 0 else {}
    by_name = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not by_name:
        return {}
    index = {n: i for i, n in enumerate(param_names(model, optimizer))}
    return _rekey(by_name, index)


def _rekey(optimizer_sd: dict, key: dict | list) -> dict:
    """An optimizer state dict with each parameter's key ``k`` replaced by ``key[k]`` (index to
    name, or name to index)."""
    return {"state": {key[k]: s for k, s in optimizer_sd["state"].items()},
            "param_groups": [{**g, "params": [key[k] for k in g["params"]]}
                             for g in optimizer_sd["param_groups"]]}


def load_full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer,
                          model_sd: dict, optimizer_sd: dict) -> None:
    """Load a one-process checkpoint's state into the sharded model and optimizer; every rank
    passes the whole state and keeps its shard. Collective."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, model_sd, options=_options())
    optimizer.state.clear()
    if not optimizer_sd["state"]:  # saved before the first step: nothing to load (see above)
        return
    by_name = _rekey(optimizer_sd, param_names(model, optimizer))
    set_optimizer_state_dict(model, optimizer, by_name, options=_options())
