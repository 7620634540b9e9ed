"""The quantization plan and its integer semantics: config and plan data model (``plan``)
its JSON schema (``plan_schema``) and reading (``plan_io``), format propagation through the graph
(``partitions``), coefficient codes (``coeffs``), the int64/int32 proofs (``safety``) and
the element-wise table rules (``elementwise``). Says what a plan means, not how it is
chosen. May import :mod:`fixq.numerics`, :mod:`fixq.graph`, :mod:`fixq.data`, :mod:`fixq.util`."""
