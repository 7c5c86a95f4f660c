# sim-pipeline images.
#   docker build -t sim-pipeline .                                   # CLI / pod image, CPU torch
#   docker build -t sim-pipeline:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker build -t sim-pipeline-airflow --target airflow .          # Airflow with the DAG
#   docker build -t sim-pipeline-airflow:gpu --target airflow --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# The CLI image also serves (`sim-pipeline serve`); docker-compose.yaml builds all three.
# The GPU pods of the DAG run the first image: `sim-pipeline stage embed-images --run-id R --chunk I`.

FROM python:3.11-slim AS cli
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/sim-pipeline
# torch first and pinned (constraints.txt), from the index that matches the hardware.
COPY constraints.txt ./
RUN pip install -c constraints.txt torch --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md LICENSE ./
COPY sim_pipeline ./sim_pipeline
RUN pip install -c constraints.txt '.[s3,onnx,serve]' \
 && pip install --no-deps -c constraints.txt open_clip_torch
RUN useradd --create-home --uid 1000 scorer
USER scorer
ENTRYPOINT ["sim-pipeline"]
CMD ["--help"]

FROM apache/airflow:3.3.2-python3.11 AS airflow
# CPU torch by default; the inference worker's image is built with the CUDA index.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
USER root
COPY --chown=airflow:root pyproject.toml README.md LICENSE constraints.txt /opt/sim-pipeline/
COPY --chown=airflow:root sim_pipeline /opt/sim-pipeline/sim_pipeline
COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root plugins /opt/airflow/plugins
USER airflow
RUN pip install --no-cache-dir -c /opt/sim-pipeline/constraints.txt torch \
      --index-url "${TORCH_INDEX}" \
 && pip install --no-cache-dir -c /opt/sim-pipeline/constraints.txt '/opt/sim-pipeline[s3,airflow]' \
 && pip install --no-cache-dir --no-deps -c /opt/sim-pipeline/constraints.txt open_clip_torch
