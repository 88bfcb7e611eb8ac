"""lightning-mia for ``lightning.pytorch`` (``import lightning as L``).

Importing this module imports ``lightning``; nothing else in the package does before it is needed.

- :class:`ImageClassifier` is the ``lightning.pytorch`` LightningModule twin of
  :class:`lightning_mia.module.ImageClassifier` (same implementation, :class:`~lightning_mia.module.ImageClassifierMixin`;
  a LightningModule belongs to exactly one Lightning package).
- The callbacks and datamodules are the package's own classes, which subclass both packages' bases
  (:mod:`lightning_mia.compat`); they are re-exported here so one import serves a ``lightning.pytorch`` script.
- The ``lightning-mia`` LightningCLI runs on ``lightning.pytorch`` by itself when the command line or the config
  names ``lightning.pytorch`` classes (``lightning_mia.cli.build_cli(namespace="lightning.pytorch")`` in a script).

Example:
    >>> import lightning as L                                               # doctest: +SKIP
    >>> from lightning_mia.lightning import ImageClassifier, MembershipInferenceMonitor, DigitsDataModule
    >>> L.Trainer(max_epochs=3, callbacks=[MembershipInferenceMonitor()]).fit(   # doctest: +SKIP
    ...     ImageClassifier("lenet", optimizer="adam", lr=1e-3), datamodule=DigitsDataModule())
"""
from __future__ import annotations

try:
    import lightning.pytorch as _L
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("lightning_mia.lightning needs the `lightning` package (pip install lightning); with "
                      "pytorch_lightning use lightning_mia's top-level classes") from err

from lightning_mia.callbacks.constraint import PrivacyConstraint
from lightning_mia.callbacks.early_stopping import EarlyStoppingComparison
from lightning_mia.callbacks.monitor import MembershipInferenceMonitor as _Monitor
from lightning_mia.data import (CIFARDataModule, DigitsDataModule, IndexedDataset, MIADataModule,
                                MNISTDataModule, SyntheticDataModule)
from lightning_mia.module import ImageClassifier as _DefaultImageClassifier
from lightning_mia.module import ImageClassifierMixin

__all__ = ["CIFARDataModule", "DigitsDataModule", "EarlyStoppingComparison", "ImageClassifier", "IndexedDataset",
           "MIADataModule", "MNISTDataModule", "MembershipInferenceMonitor", "PrivacyConstraint",
           "SyntheticDataModule", "for_lightning"]


def for_lightning(cls: type) -> type:
    """``cls`` when it already subclasses ``lightning.pytorch``'s Callback, else a subclass of ``cls`` that also
    subclasses it (named like ``cls``, defined in this module so that it pickles for ``ddp_spawn``)."""
    if issubclass(cls, _L.Callback):
        return cls
    return type(cls.__name__, (cls, _L.Callback), {"__module__": __name__, "__qualname__": cls.__name__,
                                                    "__doc__": cls.__doc__})


MembershipInferenceMonitor = for_lightning(_Monitor)

if issubclass(_DefaultImageClassifier, _L.LightningModule):  # only lightning is installed: one class for both
    ImageClassifier = _DefaultImageClassifier
else:
    class ImageClassifier(ImageClassifierMixin, _L.LightningModule):  # type: ignore[no-redef]
        __doc__ = ImageClassifierMixin.__doc__
