# sim-pipeline images.
#   docker build -t sim-pipeline .                                   # CLI / pod image, CPU torch
#   docker build -t sim-pipeline:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker build -t sim-pipeline-airflow --target airflow .          # Airflow with the DAG
# The GPU pods of the DAG run the first image: `sim-pipeline stage embed-images --run-id R --chunk I`.

FROM python:3.11-slim AS cli
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/sim-pipeline
# torch first and pinned, from the index that matches the hardware.
RUN pip install torch==2.13.0 --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY sim_pipeline ./sim_pipeline
COPY sql ./sql
RUN pip install -e '.[s3,onnx]' && pip install --no-deps open_clip_torch==3.3.0
RUN useradd --create-home --uid 1000 scorer
USER scorer
ENTRYPOINT ["sim-pipeline"]
CMD ["--help"]

FROM apache/airflow:3.3.2-python3.11 AS airflow
USER root
COPY --chown=airflow:root pyproject.toml README.md /opt/sim-pipeline/
COPY --chown=airflow:root sim_pipeline /opt/sim-pipeline/sim_pipeline
COPY --chown=airflow:root sql /opt/sim-pipeline/sql
COPY --chown=airflow:root dags /opt/airflow/dags
COPY --chown=airflow:root plugins /opt/airflow/plugins
USER airflow
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir -e '/opt/sim-pipeline[s3,airflow]' \
 && pip install --no-cache-dir --no-deps open_clip_torch==3.3.0
