"""Third-party kernels vendored with their licence (Apache-2.0), pinned to a version:

  splash_attention_kernel.py  JAX 0.10.2's Pallas TPU splash attention kernel, plus a
                              public entry to its backward given outside statistics
                              (`splash_attention_bwd_from_stats`), which the splash ring
                              needs and JAX keeps private.
"""
