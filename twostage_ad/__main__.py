"""``python -m twostage_ad`` is the pipeline command line."""

import sys

from twostage_ad.pipeline import main

sys.exit(main())
