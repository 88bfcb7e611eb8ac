"""Train a model with a live membership-inference audit: ``python train.py fit --config configs/quickstart.yaml``.

The same CLI is installed as ``lightning-mia``; see ``python train.py fit --help`` for every option.
"""
from lightning_mia.cli import main

if __name__ == "__main__":
    main()
