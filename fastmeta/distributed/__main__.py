"""``python -m fastmeta.distributed``: the all-reduce benchmark (see :mod:`.bench`)."""
from .bench import main

raise SystemExit(main())
