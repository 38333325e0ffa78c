"""``python -m locedit.editing --prompt ... --subject ... --target ...`` (same as ``locedit edit``)."""

import sys

from locedit.editing.cli import main

sys.exit(main())
