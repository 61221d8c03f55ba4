"""Train TRM with a conditioner that computes the task's context from its demonstration pairs in
place of the learned puzzle embedding (``arch.conditioner=demo_encoder``, ...).

    python pretrain_encoder.py experiment=E1v2 preset=cpu
    torchrun --nproc-per-node 4 pretrain_encoder.py experiment=E1v2 +run_name=E1v2
"""

from trm.cli import run

if __name__ == "__main__":
    run("cfg_pretrain_encoder")
