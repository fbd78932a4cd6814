"""`python -m sctd_dist.finetune ...`"""

import sys

from sctd_dist.finetune.cli import main

if __name__ == "__main__":
    sys.exit(main())
