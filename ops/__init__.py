"""Mesa layer ops: torch custom ops (``torch.ops.mesa.*``) with Triton kernels and aten paths.

    from mesa_compile.ops import mesa_net, mesa_net_step, mesa_net_exact, MesaState
"""

from .api import MesaOutput, MesaState, mesa_net, mesa_net_exact, mesa_net_step
from .validation import debug_checks, debug_checks_enabled, set_debug_checks

__all__ = [
    "MesaOutput",
    "MesaState",
    "mesa_net",
    "mesa_net_exact",
    "mesa_net_step",
    "debug_checks",
    "debug_checks_enabled",
    "set_debug_checks",
]
