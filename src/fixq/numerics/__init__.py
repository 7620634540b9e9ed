"""Fixed-point arithmetic on tensors, with no notion of a graph or a plan: word formats,
rounding, saturation and codes (``formats``), range/exponent choice from statistics
(``ranges``) and the fused fake-quantize kernel (``fused``). May import only
:mod:`fixq.errors`."""
