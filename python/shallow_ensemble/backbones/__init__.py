"""Backbones: per-atom last-layer features shared by all ensemble members."""

from ._base import Backbone
from .soap_bpnn import SoapBpnn


__all__ = ["Backbone", "SoapBpnn"]
