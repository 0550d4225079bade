"""The compression pass: a compiled plan applied to a model on the layer walk (``compress``)."""
