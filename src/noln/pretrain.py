"""Pretrain a small model with its norms from scratch (GPT-2, GPT-NeoX or Llama family), offline.

Trains a byte-level BPE tokenizer on the corpus (``<|endoftext|>`` is id 0: BOS, EOS and the
document separator), then the model with the same loop as removal (norms kept live), and
writes a plain Hugging Face folder that ``from_pretrained`` and every noln command load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from noln.arch import install
from noln.config import check_numbers, make_config
from noln.data import iter_documents, load_tokens, pack
from noln.errors import NolnError
from noln.evaluate.loss import cross_entropy
from noln.export import export_model
from noln.pretrained import load_pretrained, load_tokenizer
from noln.report import plot_loss
from noln.run import RunFolder, claim_run_folder
from noln.train import Trainer

EOT = "<|endoftext|>"


@dataclass
class PretrainResult:
    model: torch.nn.Module
    tokenizer: object
    out: Path
    summary: dict


def train_tokenizer(source: str, vocab_size: int, max_docs: int | None = None):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    def docs():
        for i, d in enumerate(iter_documents(source)):
            if max_docs is not None and i >= max_docs:
                return
            yield d

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(docs(), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[EOT], show_progress=False)
    if bpe.get_vocab_size() < 260:
        raise NolnError(f"data '{source}' is too small to train a tokenizer: give more text")
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOT, eos_token=EOT,
                                   unk_token=EOT, model_max_length=int(1e9))


def check_arch(arch: str, d_model: int, n_head: int) -> None:
    from noln.arch import FAMILIES, supported

    if arch not in FAMILIES:
        raise NolnError(f"noln pretrain cannot build '{arch}': --arch is one of {supported()}")
    if d_model % n_head:
        raise NolnError(f"--d-model {d_model} is not divisible by --heads {n_head}")


def build_model(arch: str, vocab_size: int, n_layer: int, d_model: int, n_head: int, ctx: int,
                eot_id: int):
    from noln.arch import FAMILIES

    check_arch(arch, d_model, n_head)
    return FAMILIES[arch].build_small_model(vocab_size, n_layer, d_model, n_head, ctx, eot_id)


def pretrain(data: str, out: str | Path, *, arch: str = "gpt2", n_layer: int = 4,
             d_model: int = 128, n_head: int = 4, ctx: int = 128, vocab_size: int = 4096,
             steps: int = 600, tokens: int | None = None, batch_size: int = 32,
             lr: float = 1e-3, warmup_steps: int = 50, seed: int = 0, progress: bool = True,
             resume: bool = False, cos_reg: float = 0.0, overwrite: bool = False
             ) -> PretrainResult:
    """Pretrain into ``out`` (new or empty, a previous pretraining run with ``resume`` to
    continue it, or with ``overwrite`` to replace it)."""
    out = Path(out)
    check_numbers(("--layers", n_layer, 1, 4), ("--d-model", d_model, 1, 128),
                  ("--heads", n_head, 1, 4), ("--ctx", ctx, 2, 128),
                  ("--vocab-size", vocab_size, 260, 4096), ("--steps", steps, 1, 600),
                  ("--tokens", tokens, 1, 1_000_000), ("--batch-size", batch_size, 1, 32),
                  ("--seed", seed, 0, 0))
    if not (math.isfinite(lr) and lr > 0) or not (math.isfinite(cos_reg) and cos_reg >= 0):
        raise NolnError(f"--lr {lr} / --cos-reg {cos_reg} is invalid: --lr must be a finite "
                        "number > 0 (e.g. 1e-3), --cos-reg >= 0")
    check_arch(arch, d_model, n_head)
    with claim_run_folder(out, resume=resume, overwrite=overwrite,
                          resume_hint="--resume on the same `noln pretrain` command") as claim:
        return _pretrain(data, out, claim, arch=arch, n_layer=n_layer, d_model=d_model,
                         n_head=n_head, ctx=ctx, vocab_size=vocab_size, steps=steps,
                         tokens=tokens, batch_size=batch_size, lr=lr,
                         warmup_steps=warmup_steps, seed=seed, progress=progress,
                         resume=resume, cos_reg=cos_reg)


def _pretrain(data: str, out: Path, claim, *, arch: str, n_layer: int, d_model: int,
              n_head: int, ctx: int, vocab_size: int, steps: int, tokens: int | None,
              batch_size: int, lr: float, warmup_steps: int, seed: int, progress: bool,
              resume: bool, cos_reg: float) -> PretrainResult:
    torch.manual_seed(seed)
    run = RunFolder(out)
    if resume and run.base.is_dir():
        tokenizer = load_tokenizer(run.base)
    else:
        tokenizer = train_tokenizer(data, vocab_size)
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    model = build_model(arch, len(tokenizer), n_layer, d_model, n_head, ctx, eot_id)
    blocks = pack(load_tokens(data, tokenizer), ctx)
    n_val = max(1, len(blocks) // 20)
    train_blocks, val_blocks = blocks[:-n_val], blocks[-n_val:]
    cfg = make_config(model=str(out), data=data, out=out, keep_ln=True, steps=steps,
                      tokens=tokens, batch_size=batch_size, ctx=ctx, lr=lr, min_lr=lr / 10,
                      warmup_steps=warmup_steps, aux_weight=0.0, seed=seed, progress=progress,
                      cos_reg=cos_reg,
                      checkpoint_every=max(50, steps // 4))
    adapter = install(model)  # live FakeNorms compute the real LayerNorm
    if not resume:
        model.config.save_pretrained(run.base)
        tokenizer.save_pretrained(run.base)
    trainer = Trainer(cfg, model, train_blocks, val_blocks[:4], out, adapter,
                      eot_id=eot_id)
    claim.started()
    state = trainer.fit(resume=resume)
    model = trainer.acc.unwrap_model(trainer.model).eval()
    export_model(adapter, tokenizer, run.export("hf"))
    plain = load_pretrained(run.export("hf"))
    ce = cross_entropy(plain, val_blocks)
    summary = {"data": data, "arch": arch, "n_layer": n_layer, "d_model": d_model,
               "n_head": n_head, "ctx": ctx, "vocab_size": len(tokenizer), "steps": state.step,
               "tokens": state.step * batch_size * ctx, "train_wall_time_s": state.wall_time,
               "val_ce": ce.to_dict(), "n_params": sum(p.numel() for p in plain.parameters())}
    run.write_summary(summary)
    plot_loss(run.read_log(), run.loss_plot, title=f"pretraining {arch}")
    return PretrainResult(plain, tokenizer, run.export("hf"), summary)
