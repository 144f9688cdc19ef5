import sys

from agop.cli import main

sys.exit(main())
