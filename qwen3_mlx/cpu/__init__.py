"""The CPU speed wing: the system-BLAS preload, the native extension's Python face and the kernels
the model asks for on the CPU (quantized projections, decode ops, decode attention).

The core reaches this wing through one seam: the model imports its kernels from here. Nothing in
this package imports the engine, the session or a front end.
"""
