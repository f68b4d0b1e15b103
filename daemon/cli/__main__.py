import sys

from benchsync.daemon.cli import main

sys.exit(main())
