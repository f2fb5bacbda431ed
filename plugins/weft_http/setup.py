"""Builds weft_http's optional compiled fast path, `weft_http/_h1c.c` (metadata: pyproject.toml).

`optional=True`: without a C compiler the package installs and runs on the pure-Python path
(`weft_http.h1` checks for `_h1c` at import), which costs the server a quarter to a half more
CPU per proxied request (bench/bench_http.py, quiet runs: 67-78 us against 45-58 us; 1.53-1.69
times nginx's against 1.23; docs/performance.md, session 8).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("weft_http._h1c", ["weft_http/_h1c.c"], optional=True)])
