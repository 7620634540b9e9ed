"""Small shared services with no numerics: progress bars and status lines (``progress``),
the torchrun rank helpers (``distributed``) and the allocator setting for long CPU runs
(``alloc``). May import only :mod:`fixq.errors`; every other package may import it."""
