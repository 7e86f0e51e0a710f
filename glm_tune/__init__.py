"""glm-tune: ChatGLM-6B model and tokenizer for transformers 5."""
