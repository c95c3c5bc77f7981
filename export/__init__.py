"""ONNX export of MesaNet (fixed-step CG, early-exit Loop, or one plugin node per layer).

    from mesa_compile.export import to_onnx
    to_onnx(model, "decode.onnx", graph="decode", cg="fixed")

Importing this package needs only torch; onnx / onnxscript load when an export runs.
"""

from mesa_compile.export.onnx_export import DTYPES, GRAPHS, read_metadata, to_onnx

__all__ = ["DTYPES", "GRAPHS", "read_metadata", "to_onnx"]
