#!/bin/sh
# The GPU measurements issue #4 still lacks, for a session lent a GPU machine through the device tool. Each
# stage fits one device call (10 minutes at most; a session has 30 minutes of device time in all). Here, first:
#   sh bench/gpu_wheels.sh
# then one device call per stage, each with carry [".whl"]:
#   sh bench/gpu_session.sh tests       # tests/engine/test_gpu.py, then bench/overhead.py on the GPU
#   sh bench/gpu_session.sh clip        # bench/clip_throughput.py: ViT-B/16 and ViT-B/32, orch vs open_clip
#   sh bench/gpu_session.sh gradcache   # 65,536 image-text pairs, CLIP ViT-B/32 towers, tiled InfoNCE
# Logs and JSON go to $OUT (the device tool brings them back); figures go to bench/RESULTS.md by hand.
set -eu
out=${OUT:-/tmp/orch-gpu}
mkdir -p "$out"
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
if ! python3 -c "import deepspeed" 2>/dev/null; then  # a fresh machine, where nothing can be fetched
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
if ! python3 -c "import importlib.metadata as m; m.distribution('orch')" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .  # orch's entry points
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
case "${1:-}" in
    tests)
        python3 -m pytest -q -p no:cacheprovider -rA tests/engine/test_gpu.py 2>&1 | tee "$out/test_gpu.log"
        python3 bench/overhead.py --devices cuda --rounds 10 --json "$out/overhead.json" 2>&1 | tee "$out/overhead.md"
        ;;
    clip)
        python3 bench/clip_throughput.py --models ViT-B-16 --json "$out/clip_b16.json" 2>&1 | tee "$out/clip_b16.md"
        python3 bench/clip_throughput.py --models ViT-B-32 --json "$out/clip_b32.json" 2>&1 | tee "$out/clip_b32.md"
        ;;
    gradcache)
        python3 bench/gradcache.py --batch-size 65536 --chunks 512 --skip-off --steps 1 --warmup 1 \
            --loss infonce:tile=4096 \
            --encoder vit:image_size=224,patch_size=32,width=768,depth=12,heads=12,embed_dim=512,pool=cls,in_channels=3 \
            --text-encoder text-transformer:width=512,depth=12,heads=8,context_length=77,embed_dim=512,pool=eot \
            --json "$out/gradcache65536.json" 2>&1 | tee "$out/gradcache65536.md"
        ;;
    *)
        echo "usage: sh bench/gpu_session.sh tests|clip|gradcache" >&2
        exit 2
        ;;
esac
