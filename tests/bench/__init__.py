"""`make bench`: the gateway against the physical limit and its peers, in one interleaved run."""
