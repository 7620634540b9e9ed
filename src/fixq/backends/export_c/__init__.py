"""C99 export of a quantized model (tables + calls) with a hand-written integer runtime."""
from .emit import C_EMITTERS
from .emit_elementwise import register
from .export import ExportResult, export_c
from .run import run_c_program

register()  # the table/multiply/shuffle emitters join C_EMITTERS

__all__ = ["export_c", "ExportResult", "C_EMITTERS", "run_c_program"]
