"""``python -m taskplex_zmq broker|worker ...``: see :mod:`taskplex_zmq.cli`."""

import sys

from taskplex_zmq.cli import main

sys.exit(main())
