"""elfish-mpi: ELFISH federated learning on heterogeneous workers over MPI."""
__version__ = "0.1.0"
