"""``python -m service.worker FD``: one engine worker (``service.worker.main``)."""

import sys

from service.worker.main import main

sys.exit(main(sys.argv[1:]))
