#!/usr/bin/env bash
# Run by Snakemake once, right after it creates the conda environment of workflow/envs/nbp.yaml (`--sdm conda`),
# inside that environment and from the workflow's working directory (the repository root): puts the `nbp`
# command and package of this checkout into the environment.
set -euo pipefail
python -m pip install --no-deps --no-build-isolation --disable-pip-version-check -q -e .
