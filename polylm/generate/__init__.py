"""Backend-independent generation: sampling, text streaming, continuous batching, tokenizer, chat templates
and the task pipelines."""
