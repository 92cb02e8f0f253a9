"""``python -m sparse_peft.ops`` prints which path the ops use (prebuilt, jit or reference) without compiling;
``python -m sparse_peft.ops build`` builds the kernels just in time now."""

import sys

from ._extension import _main

raise SystemExit(_main(sys.argv[1:]))
