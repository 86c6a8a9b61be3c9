"""Reading a model directory: validated safetensors headers, canonical tensor names, Hub repo ids from the cache or downloaded."""
