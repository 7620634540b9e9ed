"""The network as fixq sees it: the node IR (``ir``), torch.fx capture and lowering into it
(``capture`` and its functional-call lowering ``functional``, with ``mobile`` for MobileNet/ShuffleNet patterns and ``onnx_lower`` for
onnx2torch modules) and the graph rewrites (``passes``: BN folding, activation fusion).
Knows nothing of formats or plans. May import :mod:`fixq.errors` only."""
