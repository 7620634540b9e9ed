"""C99 export of a quantized model (tables + calls) with a hand-written integer runtime."""
from .emit import C_EMITTERS, ExportResult, export_c
from . import emit_elementwise  # noqa: F401,E402  (registers the table/multiply/shuffle emitters)
from .run import run_c_program

__all__ = ["export_c", "ExportResult", "C_EMITTERS", "run_c_program"]
