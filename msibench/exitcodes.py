"""Exit codes of every ``msibench`` (and ``mscustomnet data``) command, one meaning each.

- ``OK`` (0): everything asked for is done and nothing failed.
- ``ERROR`` (1): an error stopped the command (bad data, a refused configuration change, missing weights, a full
  disk, an incomplete table refused...); the message says what. Anything already committed is kept.
- ``USAGE`` (2): a bad option, argument or environment value (click's own code for usage errors).
- ``FAILURES`` (3): the command ran to the end, but the run folder holds samples recorded as failed (generation or
  scoring), whatever this invocation did: a re-run that had nothing left to do still says so while they remain.
  ``build-msi``: it ran to the end, but photos the annotations name could not be read (left out, listed).
- ``BUSY`` (4): another live process is writing the same thing (the same shard of a run, a scoring pass of the same
  run folder, an MSI build, a training run or a report into the same ``--out``); nothing was done. Wait for it, or
  stop it.
"""

from __future__ import annotations

OK = 0
ERROR = 1
USAGE = 2
FAILURES = 3
BUSY = 4
