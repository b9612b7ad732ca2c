import sys

from ebslab.cli import main

sys.exit(main())
