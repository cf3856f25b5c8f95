#!/usr/bin/env bash
# Rebuild three.min.js (three.js core + OrbitControls, only what entry.js exports) from the npm
# registry, at the pinned versions. Needs node and npm; runs in a temporary folder.
set -euo pipefail
THREE=0.187.0
ESBUILD=0.28.2
here="$(cd "$(dirname "$0")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
npm init -y >/dev/null
npm install --no-audit --no-fund --save-exact "three@$THREE" "esbuild@$ESBUILD" >/dev/null
cp "$here/entry.js" entry.js
./node_modules/.bin/esbuild entry.js --bundle --minify --format=iife --global-name=THREE \
    --target=es2020 --legal-comments=none \
    --banner:js="/* three.js ${THREE} (core + OrbitControls), MIT licence (see LICENSE), bundled by esbuild $ESBUILD from stages/evaluate/vendor/entry.js */" \
    --outfile="$here/three.min.js"
cp node_modules/three/LICENSE "$here/LICENSE"
