"""Convert an official ttt-lm-jax checkpoint (StreamingCheckpointer file) into a ttt_hf folder.

    python conversion_scripts/convert_ttt_jax.py CHECKPOINT_FILE DST [--dtype bfloat16] [--set FIELD=VALUE ...]

CHECKPOINT_FILE is `streaming_train_state` (optimizer state is skipped) or `streaming_params`. The
architecture is inferred from the keys and shapes; `--set` overrides config fields (for example
`--set max_position_embeddings=8192`). Same as `ttt-hf convert`.
"""

import sys

from ttt_hf.conversion.cli import main

if __name__ == "__main__":
    sys.exit(main(["--format", "jax", *sys.argv[1:]]))
