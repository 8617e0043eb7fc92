import os

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set
# before the first import of triton or kernels/: by default every kernel test
# runs through the interpreter on CPU tensors. `TRITON_INTERPRET=0 pytest -m cuda`
# runs the compiled kernels on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
