"""Builds weft_http's optional compiled fast path, `weft_http/_h1c.c` (metadata: pyproject.toml).

`optional=True`: without a C compiler the package installs and runs on the pure-Python path
(`weft_http.h1` checks for `_h1c` at import), which costs the server a fifth to a half more CPU
per proxied request (bench/bench_http.py, three A/B pairs: 51-78 us against 43-58 us;
docs/performance.md, session 8).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("weft_http._h1c", ["weft_http/_h1c.c"], optional=True)])
