"""The contract types every layer shares; imports nothing else of asyncpp.

Layers, each importing only those below it:
core <- model <- worker <- executor <- engine <- (AsyncLLM, LLM, config) <- server <- CLI
"""
