# The tuneq worker and CLI image. TORCH_INDEX chooses the torch build: the CPU index by default,
# https://download.pytorch.org/whl/cu126 (or similar) for the GPU worker.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
RUN pip install --no-cache-dir "torch==2.13.0" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY cli ./cli
COPY worker ./worker
COPY schemas ./schemas
COPY ui ./ui
RUN pip install --no-cache-dir .
# tuneq's kernels (attention, norm, dropout, the embeddings' AdamW) are C, compiled once per
# machine; build them into the image so the slim image needs no compiler at run time (a worker
# ignores those its CPU cannot run).
ENV TUNEQ_KERNEL_CACHE=/opt/tuneq/kernels
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && python -m tuneq.worker.ml.kernels \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*
CMD ["tuneq", "worker"]
