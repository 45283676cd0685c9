"""The chat core both runtimes share: a request parsed once, its prompt, grammar and answer; the
ONNX runtime (model, scheduler, prefix cache) and the transformers runtime. Shipped inside the
logged ONNX model as the top-level package `chat`, so it imports nothing else of phi3flow."""
