import sys

from audiences.cli import main

sys.exit(main())
