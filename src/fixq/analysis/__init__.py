"""Measuring a quantized model: complexity and savings (``complexity``), accumulator
tables (``accumulators``), accuracy/SQNR evaluation (``evaluate``) and the markdown/JSON
report pieces (``report``). May import :mod:`fixq.backends` and everything below it."""
