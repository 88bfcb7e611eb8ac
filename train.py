"""Train a model with a live membership-inference audit: ``python train.py fit --config configs/quickstart.yaml``.

The same CLI is installed as ``lightning-mia``; see ``python train.py fit --help`` for every option.
"""
import sys

from lightning_mia.commands import main

if __name__ == "__main__":
    sys.exit(main())
