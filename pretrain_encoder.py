"""Train TRM with a demonstration encoder in place of the learned puzzle embedding.

    python pretrain_encoder.py experiment=E1v2 preset=cpu
    torchrun --nproc-per-node 4 pretrain_encoder.py experiment=E1v2 +run_name=E1v2
"""

import encoders  # noqa: F401  (registers the encoders)
from encoders.config import EncoderTrainConfig
from trm.cli import run

if __name__ == "__main__":
    run("cfg_pretrain_encoder", EncoderTrainConfig)
