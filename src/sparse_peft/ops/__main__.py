"""``python -m sparse_peft.ops`` prints which path the ops use; ``python -m sparse_peft.ops build`` builds the kernels."""

import sys

from ._extension import _main

raise SystemExit(_main(sys.argv[1:]))
