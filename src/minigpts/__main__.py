"""``python -m minigpts``: the CLI without the console script (a machine whose Python holds the
package on ``PYTHONPATH`` only, e.g. the GPU check's)."""

from minigpts.cli import main

raise SystemExit(main())
