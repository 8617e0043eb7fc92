"""Constants shared by the engine, the backends and the kernels."""

EPS = 1e-16  # added to every gradient norm, as in the published code: a zero gradient moves nothing
