"""The names a user can choose from, in one torch-free module.

The library validates against these and the CLI builds its ``choices=`` from them, so a new
option appears in both at once, and ``agop --help`` stays fast (nothing here imports torch).
"""

#: Random-feature distributions of Deep RFM (:func:`agop.models.deep_rfm.random_weights`).
FEATURES = ("gaussian", "uniform")
#: Kernels (:data:`agop.kernels.KERNELS`).
KERNEL_NAMES = ("laplace", "gaussian")
#: Ways to evaluate a kernel machine's AGOP (:func:`agop.kernel_agop`).
AGOP_METHODS = ("auto", "direct", "gram")
#: Deep RFM solvers: the exact N × N solve, Nyström over M centers, or whichever fits.
SOLVERS = ("auto", "exact", "nystrom")
#: Compute dtypes ("auto": :func:`agop.backend.default_dtype`).
DTYPES = ("auto", "float32", "float64")
#: Devices ("auto": the GPU if there is one).
DEVICES = ("auto", "cpu", "cuda")
#: Training presets of the MLP study (:data:`agop.models.mlp.PRESETS`).
MLP_PRESETS = ("paper", "authors")
