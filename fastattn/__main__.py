"""``python -m fastattn ...``: the same command line as ``fastattn``."""
from fastattn.cli import main

raise SystemExit(main())
