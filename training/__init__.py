"""Scripts that build the lynx-ref-moe reference model: corpus, tokenizer, training, eval data, model card."""
