# Here, before the first call (no device time): what calls 1 and 2 carry, each under the 64 MiB
# a call's tree may hold. Run from the repo root with the project's venv active and the GGUF in
# ~/.cache/noln/models (../shared/models/smollm2/fetch.sh ~/.cache/noln/models).
#   call 1: carry [".whl", ".dev/a"]  ->  bash docs/benchmarks/smollm2/h200/call1-setup.sh
#   call 2: carry [".dev/b"]          ->  bash docs/benchmarks/smollm2/h200/call2-main.sh ...
# (within the machine's 30 s idle window after call 1, or GGUF part 1 is gone with it)
set -e
printf '/.whl/\n/.dev/\n' >> .git/info/exclude
mkdir -p .whl .dev/a .dev/b
# the packages the device image lacks (KINDS.md), at this venv's versions; its torch,
# transformers 5.17, accelerate and tokenizers are used as they are
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated_types typing_inspection \
  typing_extensions==4.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0 \
  typer==0.29.2 rich==15.0.0 fsspec==2026.9.0
G=~/.cache/noln/models/SmolLM2-135M-Instruct.Q4_1.gguf
head -c 41362432 "$G" > .dev/a/gguf.part1
tail -c +41362433 "$G" > .dev/b/gguf.part2
xz -T2 -6 -c ../shared/data/corpus/train.jsonl > .dev/a/train.jsonl.xz
xz -T2 -6 -c ../shared/data/hellaswag/validation.jsonl > .dev/a/validation.jsonl.xz
cp ../shared/data/corpus/val.jsonl ../shared/data/corpus/wiki.jsonl .dev/a/
python - <<'PY'
import os
from transformers import AutoConfig, AutoTokenizer
d, f = os.path.expanduser("~/.cache/noln/models"), "SmolLM2-135M-Instruct.Q4_1.gguf"
AutoConfig.from_pretrained(d, gguf_file=f).save_pretrained(".dev/a/smolcfg")
AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(".dev/a/smolcfg")
PY
du -cb .whl .dev/a | tail -1; du -cb .dev/b | tail -1
