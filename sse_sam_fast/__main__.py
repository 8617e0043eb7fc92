"""``python -m sse_sam_fast``: the same commands as the ``sse-sam-fast`` script."""

from .cli import main

raise SystemExit(main())
