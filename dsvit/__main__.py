import sys

from dsvit.cli import main

sys.exit(main())
