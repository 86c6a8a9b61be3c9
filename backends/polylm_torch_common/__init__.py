"""The torch runtime that the torch and Triton backends share: the forward pass over a preallocated KV cache
(`runtime`), the params read from the checkpoint (`params`), the plain-torch reference ops every kernel is tested
against (`ops`), and tensor parallelism over torch.distributed (`parallel`).

It is not a backend and registers nothing: `polylm_torch` runs it with its compiled CPU kernels, `polylm_triton`
with its Triton kernels, each by subclassing `ops.ReferenceOps`.
"""
