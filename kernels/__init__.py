"""fastdiff's Triton kernels and their launchers, installed as ``fastdiff.kernels``."""

# Passed to every launch. FP fusion (a * b + c as one FMA) is what the kernels' instruction counts
# and every measurement assume; Triton 3.9 warns that its default turns it off in 3.10, so it is
# asked for explicitly rather than left to the installed version's default.
COMPILE_OPTIONS = {"enable_fp_fusion": True}
