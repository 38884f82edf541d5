"""On the device: the edge bundle and its torch-free check, upscale, the latency budget and its probe."""
