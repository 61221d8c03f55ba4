"""Train TRM with learned puzzle embeddings (the original model): the conditioners that are learned
per puzzle (``arch.conditioner=puzzle_embedding``).

    python pretrain.py experiment=E0v2 preset=cpu
    torchrun --nproc-per-node 4 pretrain.py experiment=E0v2 +run_name=E0v2
"""

from trm.cli import run

if __name__ == "__main__":
    run("cfg_pretrain")
