#!/bin/sh
# Wheels for what orch and its GPU benchmarks need beyond the lent GPU machine's image (which has Python 3.12,
# torch, transformers, pluggy, click, rich, timm, ...; nothing can be fetched there), saved into .whl/
# (git-ignored) to travel with the device tool's `carry`. Versions are the ones this project is tested with.
# Left out: ruff and the MiniLM package (90 MB; only the hf-text tests need it).
#
#   sh bench/gpu_wheels.sh            # here, once a session (about a minute)
#   then, on the device (run with carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -e
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    alembic==1.20.1 annotated-types==0.7.0 blinker==1.9.0 braceexpand==0.1.7 cachetools==7.3.3 cffi==2.0.0 \
    cryptography==48.0.0 databricks-sdk==0.162.0 docker==7.1.0 fastapi==0.165.0 flask==3.1.3 flask-cors==6.0.2 \
    gitdb==4.0.12 gitpython==3.2.1 google-auth==2.63.0 graphene==3.4.3 graphql-core==3.2.8 graphql-relay==3.2.0 \
    gunicorn==26.2.0 hjson==3.1.0 huey==3.5.4 importlib-metadata==9.1.0 itsdangerous==2.2.0 mako==1.4.3 \
    mlflow==3.17.2 mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 mlxtend==0.25.0 opentelemetry-api==1.45.2 \
    opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 \
    prettytable==3.18.0 psycopg==3.3.9 psycopg-binary==3.3.9 pyasn1==0.6.3 pyasn1-modules==0.4.2 pycparser==3.0 \
    pydantic==2.13.4 pydantic-core==2.46.4 python-dotenv==1.2.2 skops==0.16.0 smmap==5.0.3 sqlalchemy==2.1.9 \
    sqlparse==0.6.1 starlette==1.10.0 typing-inspection==0.4.2 uvicorn==0.54.0 wcwidth==0.7.0 webdataset==1.0.2 \
    open-clip-torch==3.3.0 ftfy==6.3.1
# DeepSpeed publishes a source distribution only: build its (pure-Python) wheel here; its ops JIT-compile there
pip wheel -q --no-deps -w .whl deepspeed==0.19.8
du -sh .whl
