# Source on the GPU machine (repo root): installs the carried wheels once, sets the factory's dirs.
# Wheels (here): ../shared/tools/gpu-wheels.sh .gpu/wheels 'prefect==3.8.8' 'fastapi<0.151' gguf pydantic-settings
# [+ 'moto[server]' boto3 for the stage store; lm-eval's wheels for task accuracy]. A call carries at most
# 64 MiB: carry one set (MF_GPU_WHEELS=.gpu/<set>, default .gpu/wheels) with only what the run needs.
WHEELS=${MF_GPU_WHEELS:-.gpu/wheels}
export MODELFACTORY_HOME=/root/mfhome MODELFACTORY_CACHE_DIR=/root/mfcache MODELFACTORY_DATA_DIR=/root/mfdata
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
mkdir -p /root/mfhome /root/mfcache /root/mfdata /root/keep
if [ -d "$WHEELS" ] && ! python3 -c "import gptqmodel, prefect, gguf" 2>/dev/null; then
  # --no-deps: the set was resolved here against the image's package list (gpu-wheels.sh)
  python3 -m pip install -q --no-deps --no-index "$WHEELS"/*.whl "$WHEELS"/deps/*.whl
fi
for d in "$WHEELS/data" .gpu/data; do if [ -d "$d" ]; then cp -r "$d"/. /root/mfdata/; fi; done
if [ -d .gpu/tok32k ]; then cp -r .gpu/tok32k /root/keep/; fi
for p in .gpu/p*/gguf.part*; do [ -f "$p" ] && cp "$p" /root/keep/; done
# The compile caches (Inductor, Triton, GPTQModel/Marlin, torch extensions, CUDA) under MODELFACTORY_CACHE_DIR,
# as the factory's step processes get them (modelfactory/core/caches.py), also for in-process scripts.
# Compile vs measurement of a GPU stage: python3 bench/compile_cache.py --shape llama-1.1b --out bench/results
eval "$(python3 -m modelfactory.core.caches)"
true
