"""The only code that touches SGLang internals: plugin, KVCommRadixCache, segment store, launch
(DESIGN.md §2). Built by the SGLang backend issue."""
