from __future__ import annotations

import sys

from imsd.cli import main

sys.exit(main())
