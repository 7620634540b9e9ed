"""Executing a graph + plan: the float-carrier simulation (``simulate``), the bit-exact
integer engine (``engine``), QDQ ONNX export (``onnx_out``), C99 export with its runtime
(``export_c``) and the shared pooling windows (``pooling``). May import
:mod:`fixq.planning` and everything below it; never decides a format."""
