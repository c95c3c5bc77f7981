"""Runtimes for exported MesaNet graphs (onnxruntime; imports onnxruntime only when used).

from mesa_compile.runtimes import OrtSession
"""

from mesa_compile.runtimes.ort import PROVIDERS, OrtSession

__all__ = ["PROVIDERS", "OrtSession"]
