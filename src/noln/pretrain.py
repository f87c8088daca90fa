"""Pretrain a small model with its norms from scratch (GPT-2, GPT-NeoX or Llama family), offline.

Trains a byte-level BPE tokenizer on the corpus (``<|endoftext|>`` is id 0: BOS, EOS and the
document separator), then the model with the same loop as removal (norms kept live), and
writes a plain Hugging Face folder that ``from_pretrained`` and every noln command load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from noln.arch import FAMILIES, install, supported
from noln.config import (
    PretrainConfig,
    flag_name,
    make_pretrain_config,
    merge_layers,
    same_setting,
    scaled_min_lr,
    with_added_settings,
)
from noln.data import iter_documents, load_tokens, pack
from noln.errors import NolnError
from noln.evaluate.loss import cross_entropy
from noln.export import export_model
from noln.pretrained import load_pretrained, load_tokenizer
from noln.report import plot_loss
from noln.run import RunFolder, claim_run_folder
from noln.train import Trainer

EOT = "<|endoftext|>"

# --resume: what a pretraining run fixes at its start: the data and its order (the tokenizer was
# trained on it, the held-out blocks cut from it), and the model's shape, which its checkpoint's
# weights have. The rest (length, learning rate, checkpoints, precision ...) the command line
# may change
RESUME_FIXED = ("data", "arch", "n_layer", "d_model", "n_head", "vocab_size", "ctx",
                "batch_size", "seed")


@dataclass
class PretrainResult:
    model: torch.nn.Module
    tokenizer: object
    out: Path
    summary: dict


def train_tokenizer(source: str, vocab_size: int, max_docs: int | None = None):
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


def check_arch(arch: str) -> None:
    if arch not in FAMILIES:
        raise NolnError(f"noln pretrain cannot build '{arch}': --arch is one of {supported()}")


def build_model(arch: str, vocab_size: int, n_layer: int, d_model: int, n_head: int, ctx: int,
                eot_id: int):
    check_arch(arch)
    if d_model % n_head:
        raise NolnError(f"--d-model {d_model} is not divisible by --heads {n_head}")
    return FAMILIES[arch].build_small_model(vocab_size, n_layer, d_model, n_head, ctx, eot_id)


def pretrain(data: str, out: str | Path, *, resume: bool = False, overwrite: bool = False,
             **settings) -> PretrainResult:
    """Pretrain into ``out`` (new or empty, a previous pretraining run with ``resume`` to
    continue it, or with ``overwrite`` to replace it). ``settings`` are ``PretrainConfig``
    fields (``arch=``, ``n_layer=``, ``steps=``, ``lr=`` ...), every one checked first; on
    resume, those given change the run's own (``resume_config``: not its ``RESUME_FIXED``)."""
    if resume:
        if overwrite:
            raise NolnError("--resume continues a run and --overwrite replaces one: give one "
                            "of them")
        cfg = resume_config(Path(out), data, settings)
    else:
        cfg = make_pretrain_config(data=data, out=out, **settings)
    check_arch(cfg.arch)
    with claim_run_folder(cfg.out, resume=resume, overwrite=overwrite,
                          resume_hint="--resume on the same `noln pretrain` command") as claim:
        return _pretrain(cfg, claim, resume)


def resume_config(out: Path, data: str, settings: dict[str, Any]) -> PretrainConfig:
    """The config of ``noln pretrain --resume``: the run's own settings (those its last
    checkpoint saved) with the command line's ``settings`` (None: not given) on top. The model is
    built from it, so a value of ``RESUME_FIXED`` that differs from the run's is refused here,
    before anything loads or trains; a new ``lr`` scales the run's ``min_lr`` with it unless
    ``min_lr`` is given too (the cosine keeps its shape), as ``noln remove --resume`` does."""
    _, ckpt = RunFolder(out).load_latest_checkpoint()  # none: "nothing to resume"
    saved = ckpt.get("config")
    if not isinstance(saved, dict) or "arch" not in saved:
        raise NolnError(f"'{out}' holds no `noln pretrain` run (its checkpoint has no "
                        "pretraining settings): check --out, or resume a removal run with "
                        f"`noln remove --resume {out}`")
    given = {k: v for k, v in {"data": data, **settings}.items() if v is not None and k != "out"}
    saved = with_added_settings(saved, given, PretrainConfig)
    for field in RESUME_FIXED:
        if field in given and not same_setting(field, saved[field], given[field]):
            flag = flag_name((field,), PretrainConfig)
            fix = f"give {flag} {saved[field]}" if field == "data" else f"drop {flag}"
            raise NolnError(
                f"{flag} {given[field]} differs from the run's {saved[field]}: --resume keeps "
                f"the run's {', '.join(flag_name((f,), PretrainConfig) for f in RESUME_FIXED)}; "
                f"{fix}, or start a new run with another --out")
    changed = {k: v for k, v in given.items() if k not in RESUME_FIXED}
    return make_pretrain_config(**{**merge_layers(saved, changed), **scaled_min_lr(saved, changed),
                                   "data": given.get("data", saved["data"]), "out": str(out)})


def _pretrain(cfg: PretrainConfig, claim, resume: bool) -> PretrainResult:
    run = RunFolder(cfg.out)
    torch.manual_seed(cfg.seed)
    if resume and run.base.is_dir():
        tokenizer = load_tokenizer(run.base)
    else:
        tokenizer = train_tokenizer(cfg.data, cfg.vocab_size)
    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    model = build_model(cfg.arch, len(tokenizer), cfg.n_layer, cfg.d_model, cfg.n_head, cfg.ctx,
                        eot_id)
    blocks = pack(load_tokens(cfg.data, tokenizer), cfg.ctx)
    n_val = max(1, len(blocks) // 20)
    train_blocks, val_blocks = blocks[:-n_val], blocks[-n_val:]
    adapter = install(model)  # live FakeNorms compute the real LayerNorm
    if not resume:
        model.config.save_pretrained(run.base)
        tokenizer.save_pretrained(run.base)
    trainer = Trainer(cfg, model, train_blocks, val_blocks[:4], run.root, adapter, eot_id=eot_id)
    claim.started()
    state = trainer.fit(resume=resume)
    model = trainer.acc.unwrap_model(trainer.model).eval()
    export_model(adapter, tokenizer, run.export("hf"), source=run.root)
    plain = load_pretrained(run.export("hf"))
    ce = cross_entropy(plain, val_blocks)
    summary = {"data": cfg.data, "arch": cfg.arch, "n_layer": cfg.n_layer,
               "d_model": cfg.d_model, "n_head": cfg.n_head, "ctx": cfg.ctx,
               "vocab_size": len(tokenizer), "steps": state.step,
               "tokens": state.step * cfg.batch_size * cfg.ctx,
               "train_wall_time_s": state.wall_time,
               "val_ce": ce.to_dict(), "n_params": sum(p.numel() for p in plain.parameters())}
    run.write_summary(summary)
    plot_loss(run.read_log(), run.loss_plot, title=f"pretraining {cfg.arch}")
    return PretrainResult(plain, tokenizer, run.export("hf"), summary)
