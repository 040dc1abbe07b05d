"""Reading shards for models: the streaming sample reader, the evaluation decoders (CPU and GPU) and the
random-access training batches."""
