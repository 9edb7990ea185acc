import sys

from swiftlm.cli import main

sys.exit(main())
