"""`python -m swiftlm.bench ...`: the bench commands without the rest of the swiftlm CLI."""
import sys

from swiftlm.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
