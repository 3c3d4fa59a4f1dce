#!/usr/bin/env python
"""Export a megaq checkpoint as a Hugging Face GPT-2 model directory.

    python tools/export_hf.py runs/gpt2_int8/checkpoints hf/gpt2_int8
    python tools/export_hf.py runs/gpt2_int8/checkpoints/step_00001000 hf/gpt2_int8_step1000

The first argument is a checkpoint directory or a run's checkpoint.dir (its newest complete
checkpoint is used). Any tensor-parallel size and ZeRO stage; the output (config.json +
model.safetensors) loads with transformers.GPT2LMHeadModel.from_pretrained(output_dir).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import megaq  # noqa: F401
except ImportError:  # a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megaq.training.checkpoint import CheckpointError  # noqa: E402
from megaq.training.export_hf import export_hf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint directory, or a run's checkpoint.dir")
    parser.add_argument("output", help="directory to write config.json and model.safetensors into")
    args = parser.parse_args(argv)
    try:
        out = export_hf(args.checkpoint, args.output)
    except CheckpointError as e:
        print(f"export_hf: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}/config.json and {out}/model.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
