"""dprdm: differentially private retrieval-augmented image generation (DP-RDM).

The prompt flows encoder -> private step -> ledger -> generator:

* ``dprdm.privacy``    -- the privacy-critical code: accounting, the private retrieval mechanism,
                          the privacy ledger, and the entropy source for noise. Nothing outside it
                          touches private records.
* ``dprdm.retrieval``  -- the on-disk embedding index and the exact / faiss searchers.
* ``dprdm.cli``        -- the ``dprdm`` command line.
"""

__version__ = "0.1.0"
