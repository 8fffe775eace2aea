# One image for every Aegaeon service; the container's command picks the service:
#   aegaeon serve gateway | scheduler | worker | model-store
# CPU build by default. For CUDA workers build with
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# (docker-compose.yml does this for the `gpu` profile).
FROM python:3.11-slim

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    AEGAEON_HOME=/var/lib/aegaeon \
    AEGAEON_SHM_DIR=/dev/shm

WORKDIR /opt/aegaeon

# torch first, in its own layer: it is by far the largest and changes least often.
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

# A non-editable install: tests/test_packaging.py checks that such an install carries every module.
COPY pyproject.toml README.md ./
COPY aegaeon ./aegaeon
COPY services ./services
RUN pip install . && aegaeon --help > /dev/null

RUN useradd --create-home --uid 10001 aegaeon \
    && mkdir -p /var/lib/aegaeon /models \
    && chown aegaeon /var/lib/aegaeon /models
USER aegaeon

EXPOSE 8000
CMD ["aegaeon", "serve", "gateway", "--host", "0.0.0.0", "--port", "8000"]
