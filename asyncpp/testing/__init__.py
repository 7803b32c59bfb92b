"""Testing apps against a real asyncpp engine: the tiny random model and its tokenizer."""
