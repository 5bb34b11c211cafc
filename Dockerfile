# One image for every Steer process (api, train-worker, infer-worker, migrate); the command differs.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    STEER_DATA_DIR=/data

WORKDIR /app
# CPU torch by default; build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
# for GPU workers.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX" "torch>=2.13,<2.15"

COPY pyproject.toml README.md ./
COPY core ./core
COPY api ./api
COPY workers ./workers
COPY migrations ./migrations
RUN pip install . && useradd --create-home --uid 10001 steer && mkdir -p /data && chown steer /data

USER steer
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
    CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)" || exit 1
CMD ["steer", "serve", "--host", "0.0.0.0", "--port", "8000"]
