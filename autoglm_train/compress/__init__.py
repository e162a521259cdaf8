"""Compression of trained dual encoders: structured pruning, distillation, ONNX export, INT8 on ONNX
Runtime."""

# how each exported graph is quantized (compress.quantize); here so that config checks need no onnxruntime
QUANT_MODES = ("static", "dynamic", "none")
# what the pruner (compress.prune) takes; here so that config checks need no torch_pruning
IMPORTANCES = ("l1", "l2", "taylor")
SCOPES = ("per_layer", "global")
KINDS = ("heads", "mlp", "channels", "stem")
