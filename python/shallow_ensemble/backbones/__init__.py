"""Backbones: per-atom last-layer features shared by all ensemble members."""

from ._base import Backbone
from .soap_bpnn import SoapBpnn
from .stacked import StackedBackbone


__all__ = ["Backbone", "SoapBpnn", "StackedBackbone"]
