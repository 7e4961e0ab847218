"""`python -m instseg ...` = `instseg ...` (inside Ray jobs, where the working directory is shipped but the
package is not installed)."""

import sys

from instseg.cli import main

if __name__ == "__main__":
    sys.exit(main())
