"""The 3-hop chain of ``chain_memory.py`` as a module ``choreo worker`` can run:

    python -m choreo worker bench.process_chain:app --broker redis://...

(from the repository root; ``worker_process.py`` starts it that way).
"""

from __future__ import annotations

from bench.chain_memory import chain_app

app = chain_app()
