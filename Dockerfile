# syntax=docker/dockerfile:1.10
# The evaluation image: vLLM's CUDA image + requirements/gpu.txt + the model baked in at build time.
#
# No ENV line here copies a preset value: the launcher reads every default from env/defaults.env (the
# single source; tests/test_dockerfile.py fails on a copy). Change a value at run time with
# `docker run -e KEY=value`, exactly as `inv run` takes an exported variable.
#
#   docker build -t qa-serve .
#   docker build --secret id=modelscope_token,env=MODELSCOPE_API_TOKEN -t qa-serve .   # a private model
#   docker run --gpus all -p 8000:8000 qa-serve
FROM vllm/vllm-openai:v0.26.0

WORKDIR /app

# vllm is already in the base image (pip keeps it); this adds the rest of requirements/gpu.txt.
COPY requirements/ requirements/
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir -r requirements/gpu.txt

COPY . .

# Bake the model: MODEL_ID, MODEL_REVISION and MODEL_DIR come from env/defaults.env through env.layer().
# A token for a private model is a build secret (never stored in a layer); without it the download is anonymous.
RUN --mount=type=secret,id=modelscope_token,env=MODELSCOPE_API_TOKEN python3 -m downloader

EXPOSE 8000
# GET /health/ready on PORT (read through the presets, so `-e PORT=...` is followed).
HEALTHCHECK --interval=15s --timeout=10s --start-period=900s --retries=3 \
    CMD ["python3", "-m", "env.launcher", "healthcheck"]

# The same launcher as everywhere else; install and download were done above.
ENTRYPOINT []
CMD ["python3", "-m", "invoke", "run", "--skip-install", "--skip-download"]
