"""Rank rules: the uniform rules every low-rank method shares (``uniform``) and WeLore's global threshold
on normalised spectra (``welore``)."""
