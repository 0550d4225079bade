"""Pure math shared by the methods: whitened SVD and matrix roots (``linalg``), the integer grid and
packing (``quant``), the damped inverse Hessian of GPTQ and SparseGPT (``hessian``)."""
