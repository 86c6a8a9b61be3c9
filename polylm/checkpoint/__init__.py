"""Reading a model directory: validated safetensors headers, canonical tensor names, Hub cache lookup."""
