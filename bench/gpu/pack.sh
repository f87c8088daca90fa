#!/usr/bin/env bash
# Pack what a GPU session needs for SmolLM2 into .device/ (git-ignored), as two loads that each
# fit the device's 64 MiB per call: .device/a (half the GGUF, the corpus, the wheels the device
# image lacks) and .device/b (the other half, HellaSwag). bench/gpu/README.md says how to run.
#
#   bash bench/gpu/pack.sh            # GGUF from ~/.cache/noln/models, data from ../shared
set -euo pipefail
cd "$(dirname "$0")/../.."
GGUF=${GGUF:-$HOME/.cache/noln/models/SmolLM2-135M-Instruct.Q4_1.gguf}
SHARED=${SHARED:-../shared}
[ -f "$GGUF" ] || { echo "no GGUF at $GGUF: run $SHARED/models/smollm2/fetch.sh first" >&2; exit 2; }
mkdir -p .device/a/whl .device/b
# uneven halves: load a also carries ref-gpt2-6L and the corpus (each load < 64 MiB with the repo)
head -c 38800000 "$GGUF" > .device/a/smol.gguf.0
tail -c +38800001 "$GGUF" > .device/b/smol.gguf.1
sha256sum "$GGUF" | cut -d' ' -f1 > .device/b/smol.gguf.sha256
for f in train val wiki; do gzip -c "$SHARED/data/corpus/$f.jsonl" > ".device/a/$f.jsonl.gz"; done
gzip -c "$SHARED/data/hellaswag/validation.jsonl" > .device/b/hellaswag.jsonl.gz
# ref-gpt2-6L for the bf16-vs-fp32 removal, its weights in bf16 (13 MiB instead of 26): both
# runs start from these same rounded weights
python3 - "$SHARED/models/ref-gpt2-6L" .device/ref-gpt2-6L <<'PY'
import shutil, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for f in src.iterdir():
    if f.name != "model.safetensors":
        shutil.copy(f, dst / f.name)
state = load_file(src / "model.safetensors")
save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()},
          dst / "model.safetensors", metadata={"format": "pt"})
PY
tar czf .device/a/ref-gpt2-6L.tgz -C .device ref-gpt2-6L && rm -r .device/ref-gpt2-6L
# the device image (Python 3.12) has torch, transformers, accelerate, typer, rich, pyarrow ...
# but not these (/work/.library/device/KINDS.md)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .device/a/whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 gguf==0.19.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
du -sh .device/a .device/b
