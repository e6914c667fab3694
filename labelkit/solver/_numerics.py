"""Numeric constants of the Sinkhorn solver, shared by its kernels, sweeps and dense products."""

import math


_BF16_FLOOR = -80.0  # exp(-80) ~ 1.8e-35: still a normal bfloat16 number


_EXP_MIN = -87.0  # exp(-87) ~ 1.6e-38: the smallest exponent whose exp is a normal float32 and bfloat16


_EXP_FLOOR = math.exp(_EXP_MIN)


_PROBE = 12  # plain iterations that estimate the convergence rate before over-relaxing


_LOG_RANGE = 75.0  # |log| bound of scalings used in float32 products (float32 tops out near e^88)


_PATIENCE = 40  # over-relaxed iterations without a new best error before relaxing less


_SMALL = 1 << 20  # kernels with fewer entries are solved on one thread


_SPARSE_SHARE = 0.10  # a kernel with at most this share of non-zero entries is kept as sparse rows (CSR)


_SPARSE_MIN = _SMALL  # fewer entries: kept dense (small solves stay exactly as before)


_SPARSE_BYTES = 16  # per non-zero: float32 value and int32 column, in the rows and again in the transpose


_BAIL_RATE = 0.99  # a probe shrinking the error by less than 1 % an iteration switches to annealing


_STALL = 50  # iterations over which a direct solve's rate is judged against the budget left
