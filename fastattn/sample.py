"""Sample from a trained GPT checkpoint: ``python -m fastattn.sample --checkpoint runs/tiny``.

The options and the work live in ``fastattn.train`` (``add_sample_arguments``,
``sample``, ``sample_main``), which ``fastattn sample`` also uses.
"""
from __future__ import annotations

import argparse
import sys

from fastattn.train import add_sample_arguments, sample_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn.sample",
                                     description="Generate text from a fastattn GPT checkpoint.")
    add_sample_arguments(parser)
    return sample_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
