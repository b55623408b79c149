"""``python -m fastattn ...``: the same command line as ``fastattn``."""
from fastattn.tools.cli import main

raise SystemExit(main())
