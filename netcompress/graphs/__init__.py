"""TensorFlow graphs: config -> model, inference and gated graphs, the
training graph and step, replicas, the serving graph, metrics and op errors."""
