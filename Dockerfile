# datapool as a container: one increment per `docker run`, pools and history in the shared dir.
#   docker build -t datapool .
#   docker run --gpus all --rm -v IN:/home/input_dir:ro -v SHARED:/home/shared_dir \
#     -v OUT:/home/output_dir datapool datapool.name=my_datapool stopping_condition.min_distance=0.1
# GPU-capable: the torch wheels pinned in pyproject.toml bundle the CUDA runtime; `--gpus all`
# supplies the driver (NVIDIA Container Toolkit). Without a GPU the same image runs on CPU.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends git \
 && rm -rf /var/lib/apt/lists/* \
 && git config --system --add safe.directory '*'

ENV DVC_NO_ANALYTICS=1 \
    DVC_SITE_CACHE_DIR=/tmp/dvc-site-cache \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

# The source tree stays in /opt/datapool: `datapool init` copies dvc.yaml, params.yaml and
# stages/ from it into the shared dir the first time.
WORKDIR /opt/datapool
COPY . .
RUN pip install -e .

RUN useradd --create-home --uid 1000 datapool \
 && mkdir -p /home/input_dir /home/shared_dir /home/output_dir \
 && chown datapool:datapool /home/shared_dir /home/output_dir
USER datapool
WORKDIR /home/shared_dir

ENTRYPOINT ["python", "-m", "datapool.container"]
