"""The layer walk (``layers``: the one loop that moves calibration data through the decoder layers) and
the compression pass built on it (``compress``)."""
