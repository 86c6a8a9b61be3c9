"""Framework-free numerics every backend obeys: positions, attention visibility, tensor layouts, quantization."""
