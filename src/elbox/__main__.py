"""python -m elbox"""

import sys

from elbox.cli import main

sys.exit(main())
