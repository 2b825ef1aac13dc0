# Source on the GPU machine (repo root): installs the carried wheels once, sets the factory's dirs.
# Wheels: ../shared/tools/gpu-wheels.sh .gpu/wheels 'prefect==3.8.8' 'fastapi<0.151' gguf pydantic-settings
export MODELFACTORY_HOME=/root/mfhome MODELFACTORY_CACHE_DIR=/root/mfcache MODELFACTORY_DATA_DIR=/root/mfdata
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
mkdir -p /root/mfhome /root/mfcache /root/mfdata /root/keep
if ! python3 -c "import gptqmodel, prefect, gguf" 2>/dev/null; then
  python3 -m pip install -q --no-deps --no-index .gpu/wheels/*.whl
  python3 -m pip install -q --no-index --find-links .gpu/wheels/deps 'prefect==3.8.8' 'fastapi<0.151' gguf pydantic-settings
fi
if [ -d .gpu/data ]; then cp -r .gpu/data/. /root/mfdata/; fi
if [ -d .gpu/tok32k ]; then cp -r .gpu/tok32k /root/keep/; fi
for p in .gpu/p*/gguf.part*; do [ -f "$p" ] && cp "$p" /root/keep/; done
# The compile caches (Inductor, Triton, GPTQModel/Marlin, torch extensions, CUDA) under MODELFACTORY_CACHE_DIR,
# as the factory's step processes get them (modelfactory/core/caches.py), also for in-process scripts.
# Compile vs measurement of a GPU stage: python3 bench/compile_cache.py --shape llama-1.1b --out bench/results
eval "$(python3 -m modelfactory.core.caches)"
true
