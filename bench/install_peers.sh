#!/usr/bin/env bash
# Install the peer engines for bench/bench_projector.py: plastimatch (Debian package) and DiffDRR + nanodrr (pip,
# without dependencies, so that the project's torch is never replaced). Run from anywhere; needs root for apt-get.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
torch_before="$("$python" -c 'import torch; print(torch.__version__)')"

if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q plastimatch \
        || echo "install_peers.sh: plastimatch not installed; the benchmark will report it as 'not installed'" >&2
else
    echo "install_peers.sh: no apt-get; plastimatch skipped (the benchmark reports it as 'not installed')" >&2
fi

"$python" -m pip install --no-deps -r "$here/requirements-peers.txt"

torch_after="$("$python" -c 'import torch; print(torch.__version__)')"
if [ "$torch_before" != "$torch_after" ]; then
    echo "install_peers.sh: torch changed from $torch_before to $torch_after; reinstall torch $torch_before" >&2
    exit 1
fi
"$python" -c 'import torchio, nanodrr, diffdrr.drr, diffdrr.pose; print("DiffDRR and nanodrr import")'
echo "torch $torch_after unchanged; plastimatch: $(command -v plastimatch || echo 'not installed')"
