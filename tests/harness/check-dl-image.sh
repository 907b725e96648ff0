#!/usr/bin/env bash
# Prove the deep-learning-like test image works: PyTorch imports, and its real Jupyter answers /api/status with a
# token (200) and refuses it without one (403). Publishes only on 127.0.0.1; removes its container afterwards.
set -euo pipefail
# shellcheck source=tests/harness/lib.sh
. "$(dirname "$0")/lib.sh"
name="gpulab-dl-check-$$"
token="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
trap 'docker rm -f "$name" >/dev/null 2>&1 || true' EXIT
docker run --rm "$GPULAB_DL_IMAGE" python3 -c 'import torch, numpy; print("torch", torch.__version__, "numpy", numpy.__version__, "sum", int(torch.arange(10).sum()))'
docker run -d --name "$name" --label "$GPULAB_LABEL" -p 127.0.0.1::8888 "$GPULAB_DL_IMAGE" \
    python3 -m notebook --no-browser --ip=0.0.0.0 --allow-root --notebook-dir=/workspace \
    "--NotebookApp.token=${token}" >/dev/null
port="$(docker port "$name" 8888/tcp | head -1 | sed 's/.*://')"
for _ in $(seq 1 60); do
    code="$(python3 -c "import urllib.request,sys
try: print(urllib.request.urlopen('http://127.0.0.1:${port}/api/status?token=${token}', timeout=2).status)
except Exception as e: print(getattr(e, 'code', 0))")"
    [ "$code" = 200 ] && break
    sleep 1
done
without="$(python3 -c "import urllib.request
try: print(urllib.request.urlopen('http://127.0.0.1:${port}/api/status', timeout=5).status)
except Exception as e: print(getattr(e, 'code', 0))")"
echo "jupyter /api/status with token: ${code}, without: ${without}"
if [ "$code" != 200 ] || [ "$without" != 403 ]; then
    die "the image's Jupyter did not answer as expected"
fi
