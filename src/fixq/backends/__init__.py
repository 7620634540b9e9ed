"""Executing a graph + plan: the one lowering of a plan into an integer program with its
proofs (``lowering``), consumed by the float-carrier simulation (``simulate``), the bit-exact
integer engine (``engine``) with its exact sums (``exact_sums``), QDQ ONNX export (``onnx_out``), C99 export with its runtime
(``export_c``) and the shared pooling windows (``pooling``). May import
:mod:`fixq.planning` and everything below it; never decides a format."""
