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
split -n 2 -d -a 1 "$GGUF" .device/part
mv .device/part0 .device/a/smol.gguf.0
mv .device/part1 .device/b/smol.gguf.1
sha256sum "$GGUF" | cut -d' ' -f1 > .device/b/smol.gguf.sha256
for f in train val wiki; do gzip -c "$SHARED/data/corpus/$f.jsonl" > ".device/a/$f.jsonl.gz"; done
gzip -c "$SHARED/data/hellaswag/validation.jsonl" > .device/b/hellaswag.jsonl.gz
# the device image (Python 3.12) has torch, transformers, accelerate, typer, rich, pyarrow ...
# but not these (/work/.library/device/KINDS.md)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d .device/a/whl pydantic pydantic-core annotated-types typing-inspection gguf datasets dill \
  multiprocess
du -sh .device/a .device/b
