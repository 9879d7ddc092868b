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
RUN pip install --no-cache-dir .
CMD ["tuneq", "worker"]
