"""What the tests share, one job per module (fixtures live in the conftest.py files):

- models: the tiny random checkpoints (VOCAB, make_llama, make_gpt2), their KV block size,
  and the parameter bytes a stage should load from one (checkpoint_share)
- parity: prompts of mixed lengths, the transformers greedy oracle, asyncpp's greedy tokens
- driver: microbatches driven by hand, through ModelRunners or an Executor
- fake_runner: a model-free Runner whose next token is predictable
- processes: this process's children, for leak checks
- http_server: the HTTP test server harness (constants, engine args, RunningServer, ServerPool)
- the tiny tokenizer and checkpoints themselves: asyncpp.testing (tiny_tokenizer, tiny_model), shared with the plugin
"""
