"""Compression of trained dual encoders: structured pruning, distillation, INT8 quantization, export."""
