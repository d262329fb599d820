"""Layout builders: a matched naming's tensors -> a ModelIndex. One module per storage layout
(per-expert tensors, stacked/packed tensors, GGUF, pre-sharded AMX), chosen from LAYOUTS by the
naming rule's `layout`."""
