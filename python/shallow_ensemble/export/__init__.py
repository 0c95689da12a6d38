"""Export to metatomic TorchScript models, and running them from Python."""

from .metatomic import ExportedEnsemble, export_model, to_atomistic_model


__all__ = ["ExportedEnsemble", "export_model", "to_atomistic_model"]
