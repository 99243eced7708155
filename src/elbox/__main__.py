"""python -m elbox"""

import sys

from elbox.cli.main import main

sys.exit(main())
