"""``noln demo``: the whole method offline, on text every Python install carries.

1. pretrain a tiny GPT-2 (own BPE tokenizer) on the standard library's docstrings and the
   ``pydoc_data`` help topics;
2. fine-tune it twice on the same text, steps and seed: once keeping LayerNorm (the control),
   once freezing every norm site on the adaptive schedule;
3. print original / fine-tuned with LN / without LN cross-entropy on held-out text, and write
   the models, logs and a loss curve marking each removal.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from noln.data import BUILTIN
from noln.pretrain import pretrain
from noln.remove import remove_with_control

console = Console(stderr=True)

FULL = dict(pretrain=dict(n_layer=4, d_model=128, n_head=4, ctx=128, vocab_size=4096,
                          steps=500, batch_size=16, lr=2e-3),
            remove=dict(steps=160, batch_size=16, lr=3e-4, min_lr=3e-5, warmup_steps=10))
QUICK = dict(pretrain=dict(n_layer=2, d_model=64, n_head=2, ctx=64, vocab_size=1024,
                           steps=60, batch_size=16, lr=3e-3),
             remove=dict(steps=40, batch_size=8, lr=3e-4, min_lr=3e-5, warmup_steps=4))


def run_demo(out: Path = Path("noln-demo"), quick: bool = False, progress: bool = True) -> dict:
    sizes = QUICK if quick else FULL
    out = Path(out)
    console.rule("[bold]1/2 pretrain a tiny GPT-2 on Python's own documentation")
    # the demo's own folders: a second `noln demo` replaces what the first wrote there
    base = pretrain(BUILTIN, out / "pretrained", progress=progress, overwrite=True,
                    **sizes["pretrain"])
    console.print(f"pretrained: val CE {base.summary['val_ce']['mean']:.4f} nats, "
                  f"{base.summary['n_params']:,} parameters")
    console.rule("[bold]2/2 remove its LayerNorm (and the with-LN control)")
    result = remove_with_control(str(base.out), BUILTIN, out / "removal", progress=progress,
                                 eval_tokens=128 * sizes["pretrain"]["ctx"],
                                 export_format="both", checkpoint_every=50, overwrite=True,
                                 **sizes["remove"])
    console.print(f"models, logs and loss.png in {out / 'removal'} (control in "
                  f"{out / 'removal' / 'control'}); table in {out / 'removal' / 'table.md'}")
    return result
