"""Lightning callbacks: the live membership-inference monitor and the early-stopping comparison."""
from lightning_mia.callbacks.early_stopping import EarlyStoppingComparison
from lightning_mia.callbacks.monitor import MembershipInferenceMonitor

__all__ = ["MembershipInferenceMonitor", "EarlyStoppingComparison"]
