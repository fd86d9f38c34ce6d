#!/usr/bin/env bash
# Copies what scripts/gpu-check.sh needs on the GPU machine into DEST: this checkout's files (tracked,
# and untracked ones git does not ignore; not models/, build folders or venvs) plus the .debs folder
# (scripts/fetch-gpu-debs.sh). For tools that send one folder to the GPU machine (docs/gpu.md
# "Running on the GPU machine"); about 36 MB. Usage: scripts/gpu-carry.sh DEST [DEBS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:?usage: scripts/gpu-carry.sh DEST [DEBS_DIR]}
debs=${2:-.debs}
[ -d "$debs" ] || { echo "gpu-carry: no $debs (run scripts/fetch-gpu-debs.sh $debs first)" >&2; exit 1; }
rm -rf "$dest"
mkdir -p "$dest"
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -P -t "$dest"
cp -r "$debs" "$dest/.debs"
du -sh "$dest"
