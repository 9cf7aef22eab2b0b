"""`python -m vitkit`: the same entry point as the ``vitkit`` console script (``vitkit.cli.entry``)."""
import sys

from vitkit.cli.entry import main

sys.exit(main())
