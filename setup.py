"""The one compiled module, fedhive.compression._ckernels (the rest is in pyproject.toml).

It is optional: where it cannot be built (no C compiler), the quantizers run on their
numpy kernels instead, and the install goes on.
"""

import os

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fedhive.compression._ckernels",
            ["src/fedhive/compression/_ckernels.c"],
            extra_compile_args=["/O2"] if os.name == "nt" else ["-O3", "-std=gnu11", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
