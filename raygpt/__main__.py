import sys

from raygpt.cli import main

sys.exit(main())
