#!/usr/bin/env bash
# On a machine that reaches PyPI: the wheels (CPython 3.12, manylinux x86-64) of inferd's dependencies that
# the GPU machine's image lacks, into .whl/ (ignored by git; carried with the run, 64 MiB at most).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
  platforms="$platforms --platform $p"
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d .whl \
  "gguf>=0.10,<1" "msgspec>=0.18,<1" "pyzmq>=25,<28" fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 \
  pydantic-core==2.46.4 annotated-types==0.7.0 annotated-doc==0.0.7 typing-inspection==0.4.2 \
  typing-extensions==4.16.0 opentelemetry-api==1.45.2 importlib-metadata zipp "uvicorn>=0.29,<1" \
  "llguidance>=1.9.1,<1.10" "platformdirs>=4,<5" "python-multipart>=0.0.18,<0.1" "httptools>=0.6,<1" tzdata
du -sh .whl
