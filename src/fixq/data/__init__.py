"""Models and images in: the model zoo and weights (``zoo``), ONNX models as torch modules
(``onnx_in``), image folders and labels (``images``, ``digits``) and the
batched, prefetching image streams (``stream``). Also holds the package data files
(``lenet-digits.pt``, ``imagenet_wnids.txt``). May import :mod:`fixq.util` and
:mod:`fixq.errors`; knows nothing of graphs or quantization."""
