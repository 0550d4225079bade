"""Statistics: typed requests and additive accumulators (``accumulators``), the forward hooks that fill
them during a layer's calibration pass (``hooks``), and the whole-model gradient pass (``fisher``)."""
