import os

# PyTorch's spinning OpenMP threads collapse under any other load on small machines.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
