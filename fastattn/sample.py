"""``python -m fastattn.sample``: the sampling command, kept at this name for the README
and existing imports. The code lives in ``fastattn.models.sample``.
"""
import sys

from fastattn.models.sample import add_sample_arguments, main, sample, sample_main

__all__ = ["add_sample_arguments", "main", "sample", "sample_main"]

if __name__ == "__main__":
    sys.exit(main())
