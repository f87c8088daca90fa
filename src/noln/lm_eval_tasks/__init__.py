"""lm-evaluation-harness tasks shipped with noln (``TASKS_DIR`` is their folder).

``noln_hellaswag``: HellaSwag zero-shot (acc, acc_norm) read from a local file or the Hub
through ``noln.evaluate.hellaswag.load_hellaswag``, scored as the harness's own ``hellaswag`` task
scores it. Give the file with ``--metadata '{"hellaswag": "PATH"}'`` or the ``NOLN_HELLASWAG``
environment variable (``hf``: the Hub's ``Rowan/hellaswag``)::

    lm_eval --model hf --model_args pretrained=runs/x/model,dtype=float32 --device cpu \\
        --include_path "$(python -c 'import noln.lm_eval_tasks as t; print(t.TASKS_DIR)')" \\
        --tasks noln_hellaswag --metadata '{"hellaswag": "data/hellaswag/validation.jsonl"}'
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from noln.evaluate.hellaswag import load_hellaswag

TASKS_DIR = Path(__file__).resolve().parent
ENV = "NOLN_HELLASWAG"


def hellaswag_dataset(hellaswag: str | None = None, **_: object) -> dict:
    """The harness's ``custom_dataset`` hook: ``{"validation": Dataset}`` of query / choices /
    label rows (metadata and model arguments arrive as keyword arguments; only ``hellaswag`` is
    read)."""


    source = hellaswag or os.environ.get(ENV)
    if not source:
        raise ValueError(f"noln_hellaswag needs its data: pass --metadata '{{\"hellaswag\": "
                         f"\"PATH/validation.jsonl\"}}' or set {ENV}=PATH (or 'hf' for the Hub)")
    items = load_hellaswag(source)
    rows = [{"query": it.ctx, "choices": it.endings, "label": it.label} for it in items]
    return {"validation": datasets.Dataset.from_list(rows)}
