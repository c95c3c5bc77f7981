"""mesa-compile: MesaNet as PyTorch 2 custom ops, compiled end to end, exported to ONNX.

Top-level names: :class:`MesaConfig`, :class:`MesaLayer`, :class:`MesaNetLM` and the recurrent
state types. Importing this package needs only torch.
"""

from mesa_compile.config import MesaConfig
from mesa_compile.layer import MesaLayer
from mesa_compile.model import MesaNetLM
from mesa_compile.state import MesaLayerState, MesaNetState, MesaState

__all__ = ["MesaConfig", "MesaLayer", "MesaNetLM", "MesaLayerState", "MesaNetState", "MesaState"]
