"""The engine: how a prefix reaches a frozen model's attention, and nothing about files, data or HTTP.

- `attention`: the registered attention function and the per-call `PrefixState` it reads;
- `discovery`: which modules are attention layers, and the model's key/value layout;
- `hooks`: pre-hooks that hand heads and pooling their per-row prefix state;
- `prefixes`: each method's learned (or fixed) tensors, one class per method;
- `batching`: per-row prefixes turned into one forward pass's `PrefixState` and inputs;
- `pooling`: mean pooling over real tokens, for classifiers;
- `layer_cache`: frozen layers below an upper-layer prefix, run once per row and replayed.
"""
