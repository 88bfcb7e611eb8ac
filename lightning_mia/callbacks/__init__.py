"""Lightning callbacks: the live membership-inference monitor and the early-stopping comparison."""
from lightning_mia.callbacks.early_stopping import EarlyStoppingComparison
from lightning_mia.callbacks.constraint import PrivacyConstraint
from lightning_mia.callbacks.monitor import MembershipInferenceMonitor
from lightning_mia.callbacks.references import ReferenceModels

__all__ = ["MembershipInferenceMonitor", "EarlyStoppingComparison", "PrivacyConstraint", "ReferenceModels"]
