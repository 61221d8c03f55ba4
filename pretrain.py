"""Train TRM with learned puzzle embeddings (the original model).

    python pretrain.py experiment=E0v2 preset=cpu
    torchrun --nproc-per-node 4 pretrain.py experiment=E0v2 +run_name=E0v2
"""

from trm.cli import run
from trm.config import TrainConfig

if __name__ == "__main__":
    run("cfg_pretrain", TrainConfig)
