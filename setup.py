from setuptools import find_packages, setup

setup(
    name="elfish-mpi",
    version="0.1.0",
    description="ELFISH resource-aware federated learning on heterogeneous workers, over MPI",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["elfish_mpi", "elfish_mpi.*"]),
    install_requires=[
        "mpi4py>=3.1",
        "torch>=2.0",
        "numpy>=1.23",
        "h5py>=3.6",
        # torch-pruning's dependency graph finds which channels must be cut together
        # (model groups = "auto"); pure Python, MIT, depends on torch and numpy only
        "torch-pruning>=1.5",
        # pandas: the analysis module's tables (analysis.py: runs as DataFrames, grouping over seeds);
        # tqdm: the progress bar of long commands (bench); both widely used and well kept
        "pandas>=1.5",
        "tqdm>=4.60",
        "tomli>=1.1; python_version<'3.11'",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-mpi>=0.6", "pytest-timeout>=2.1", "hypothesis>=6", "matplotlib>=3.5", "pillow>=9",
                 "safetensors>=0.4", "onnx>=1.14", "onnxscript>=0.1", "onnxruntime>=1.16"],
        # safetensors (Hugging Face's format for tensors: no pickle, memory-mapped) for elfish-mpi export
        "export": ["safetensors>=0.4", "onnx>=1.14", "onnxscript>=0.1"],
        # matplotlib for elfish-mpi report (and bench's plots)
        "report": ["matplotlib>=3.5"],
        "mpich": ["mpich"],
        "bench": ["matplotlib>=3.5", "pillow>=9"],
        "cifar": ["pillow>=9"],
    },
    entry_points={"console_scripts": ["elfish-mpi=elfish_mpi.cli:main"]},
)
