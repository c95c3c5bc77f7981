"""Names of the torch ops, defined once (the export side maps them onto ONNX/TensorRT names)."""

NAMESPACE = "mesa"
CHUNK_FWD = f"{NAMESPACE}::chunk_fwd"
CHUNK_BWD = f"{NAMESPACE}::chunk_bwd"
DECODE_STEP = f"{NAMESPACE}::decode_step"
