"""Small shared services with no numerics: progress bars and status lines (``progress``) and
the torchrun rank helpers (``distributed``). May import only :mod:`fixq.errors`; every other
package may import it."""
