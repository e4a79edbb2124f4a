#!/usr/bin/env bash
# What benchmarks/gpu_check.sh needs on a GPU machine that cannot download (issue #18 part 4), built
# here into .gpu_bundle/ (git-ignored, ~20 MB): the wheels of the dependencies its image lacks or has
# too old (transformers, datasets + dill + multiprocess, gguf; the venv's exact versions, no deps) and
# SmolLM2-135M's config and tokenizer. Not its weights: the model's GGUF (98 MB) is more than such a
# machine takes along, so the check runs a SmolLM2-shaped model with random weights there (the same
# shapes and cost: device handling and speed, not quality).
# Usage: make gpu-bundle   (or bash benchmarks/gpu_bundle.sh from the repository root, after `make install`)
set -euo pipefail
PY=.venv/bin/python
BUNDLE=.gpu_bundle
rm -rf "$BUNDLE.tmp"
mkdir -p "$BUNDLE.tmp/wheels" "$BUNDLE.tmp/smollm2"
for package in transformers datasets dill multiprocess gguf; do
  version=$($PY -c "import importlib.metadata as m; print(m.version('$package'))")
  for python in 3.11 3.12 3.13; do  # multiprocess has one wheel per Python; the others one for all
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version "$python" \
      -d "$BUNDLE.tmp/wheels" "$package==$version" 2>/dev/null || true
  done
  ls "$BUNDLE.tmp/wheels/$package-$version-"*.whl >/dev/null || { echo "no wheel of $package $version" >&2; exit 1; }
done
$PY - "$BUNDLE.tmp/smollm2" <<'PYEOF'
import shutil
import sys
from pathlib import Path

from minigpts.models import _resolve_source

_, path, _ = _resolve_source("smollm2-135m")  # the dequantised cache (converted once if absent)
for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
    if (path / name).exists():
        shutil.copy(path / name, Path(sys.argv[1]) / name)
PYEOF
rm -rf "$BUNDLE" && mv "$BUNDLE.tmp" "$BUNDLE"
du -sh "$BUNDLE"
echo "bundle ready: run benchmarks/gpu_check.sh on the GPU machine with $BUNDLE carried beside the tree"
