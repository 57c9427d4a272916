"""Pruning arithmetic on arrays and model_defs: criteria, scores, layer
selection, costs, the pruning plan, threshold searches and compress.py's
schedule. numpy only: no TensorFlow, no file reads (docs/design.md)."""
