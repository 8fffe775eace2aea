"""``bench serve``'s options as its command line resolves them, for the tests of its parts."""

from __future__ import annotations

import argparse

from aegaeon.bench import serve


def serve_args(*argv: str) -> argparse.Namespace:
    """``aegaeon bench serve ARGV`` parsed, with the --quick or default preset filled in."""
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return serve.resolve(parser.parse_args(list(argv)))
