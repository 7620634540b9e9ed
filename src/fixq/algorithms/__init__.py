"""Choosing a plan: observation and calibration (``observe``, ``calibrate``), K-means
kernel sharing (``kmeans``), mixed 8/4-bit precision (``mixed``), learned rounding
(``learned``), the model+data session (``pipeline``) and the accuracy-target searches
(``search``, ``mixed_search``, ``kmeans_search``; their acceptance rule: ``acceptance``). May import :mod:`fixq.analysis`,
:mod:`fixq.backends` and everything below them."""
