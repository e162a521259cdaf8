"""Compression of trained dual encoders: structured pruning, distillation, ONNX export, INT8 on ONNX
Runtime."""

# how each exported graph is quantized (compress.quantize); here so that config checks need no onnxruntime
QUANT_MODES = ("static", "dynamic", "none")
# who finds and cuts the structures: Torch-Pruning's dependency graph (compress.tp_prune) or our own
# (compress.prune); both take the same arguments and choose the same counts
PRUNE_BACKENDS = ("torch_pruning", "ours")
