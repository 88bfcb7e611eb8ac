"""lightning-mia: PyTorch Lightning callbacks that watch a model leak membership while it trains.

Example:
    >>> from lightning_mia import MembershipInferenceMonitor
    >>> MembershipInferenceMonitor(every_n_epochs=5).every_n_epochs
    5
"""
from typing import Any

__version__ = "0.1.0"

# Top-level names resolve lazily so `import lightning_mia` stays light (no Lightning, sklearn or matplotlib).
_EXPORTS = {
    "MembershipInferenceMonitor": "lightning_mia.callbacks.monitor",
    "EarlyStoppingComparison": "lightning_mia.callbacks.early_stopping",
    "ImageClassifier": "lightning_mia.module",
    "AuditPool": "lightning_mia.audit",
    "audit_arrays": "lightning_mia.auditor",
    "Auditor": "lightning_mia.auditor",
    "AuditResult": "lightning_mia.auditor",
    "MembershipData": "lightning_mia.membership",
    "StandardProtocol": "lightning_mia.protocols",
    "PaperProtocol": "lightning_mia.protocols",
    "RunWriter": "lightning_mia.run_writer",
    "write_report": "lightning_mia.report",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lightning_mia' has no attribute {name!r}")
